#include "core.h"

int pvd_core_abi_version(void)
{
	return 5;
}

const char *pvd_strerror(int code)
{
	switch (code) {
	case PVD_OK: return "success";
	case PVD_E_NOMEM: return "out of memory";
	case PVD_E_INVAL: return "invalid argument";
	case PVD_E_REGION_SIZE: return "region size is zero";
	case PVD_E_REGION_OVERFLOW: return "region range overflows 64 bits";
	case PVD_E_REGION_OVERLAP: return "region overlaps an existing region";
	case PVD_E_TOO_MANY_REGIONS: return "too many memory regions";
	case PVD_E_MMAP: return "mmap of the region failed";
	case PVD_E_NOT_FOUND: return "no such memory region";
	case PVD_E_OUTSIDE_MEMORY: return "address range outside guest memory";
	case PVD_E_OUTSIDE_WINDOW: return "address range outside the swiotlb window";
	case PVD_E_NOT_CONFIGURED: return "queue not configured";
	case PVD_E_QUEUE_SIZE: return "queue size is not a power of two within the maximum";
	case PVD_E_RING_ALIGN: return "ring address misaligned";
	case PVD_E_RING_MEMORY: return "ring outside guest memory";
	case PVD_E_RING_WINDOW: return "ring outside the swiotlb window";
	case PVD_E_AVAIL_IDX: return "avail.idx moved more than the queue size past last_avail_idx";
	case PVD_E_BROKEN: return "queue is broken";
	case PVD_E_COMPLETED: return "chain already completed";
	case PVD_E_RANGE: return "range outside the chain's buffer";
	case PVD_E_STALE: return "queue was reset since the chain was popped";
	case PVD_E_IO: return "I/O error";
	case PVD_E_WRONG_QUEUE: return "chain belongs to another queue";
	case PVD_E_BUSY: return "queue already has a runner";
	case PVD_C_HEAD_RANGE: return "head index out of range";
	case PVD_C_NEXT_RANGE: return "next index out of range";
	case PVD_C_TTL: return "descriptor loop or chain longer than the queue size";
	case PVD_C_DESC_MEMORY: return "descriptor buffer outside guest memory";
	case PVD_C_DESC_WINDOW: return "descriptor buffer outside the swiotlb window";
	case PVD_C_READ_AFTER_WRITE: return "device-readable descriptor after a device-writable one";
	case PVD_C_INDIRECT_LEN: return "bad indirect table length";
	case PVD_C_NESTED_INDIRECT: return "nested indirect descriptor";
	case PVD_C_INDIRECT_NEXT: return "indirect descriptor with NEXT set";
	case PVD_C_TOTAL_LEN: return "chain total length exceeds 4 GiB";
	case PVD_C_TOO_MANY_SEGS: return "chain has too many segments";
	case PVD_C_INDIRECT_MEMORY: return "indirect table outside guest memory";
	case PVD_C_INDIRECT_WINDOW: return "indirect table outside the swiotlb window";
	case PVD_C_INDIRECT_SPLIT: return "indirect table crosses a memory region boundary";
	case PVD_C_NOMEM: return "out of memory for the chain";
	default: return "unknown error";
	}
}
