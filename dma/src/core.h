/* pyvirtiofsd C core: public declarations exposed through cffi. */
#ifndef PVD_CORE_H
#define PVD_CORE_H

/* Bumped whenever the C ABI seen by Python changes. */
int pvd_core_abi_version(void);

#endif
