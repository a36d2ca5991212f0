"""C core of the device: guest memory, swiotlb windows, virtqueues (cffi)."""
