#include "core.h"

int pvd_core_abi_version(void)
{
	return 1;
}
