/* SPDX-License-Identifier: GPL-2.0-only */
/*
 * The kernel DBT's code cache: an executable, read-only section of the module, so that
 * the module loader places it in module space (within +-2 GB of kernel and module text,
 * as translated code's rel32 branches and RIP-relative operands need) and maps it
 * executable. kdbt writes it through a vmap alias of its pages (kdbt_dbt.c). PROGBITS,
 * not NOBITS: objtool's link-time pass on IBT kernels crashes on an executable NOBITS
 * section (measured on the Debian 6.12 headers); the price is the .ko's size. Filled
 * with int3.
 */
#include <linux/objtool.h>

#define KDBT_CACHE_SIZE (1024 * 1024)

	.section .kdbt_cache, "ax", @progbits
	.balign 4096
	.globl kdbt_cache_start
	.type kdbt_cache_start, @object
kdbt_cache_start:
	/* Taken by address, never an indirect-branch target itself (IBT's objtool check). */
	ANNOTATE_NOENDBR
	.fill KDBT_CACHE_SIZE, 1, 0xcc
	.balign 4096

	.section .rodata, "a"
	.balign 8
	.globl kdbt_cache_bytes
kdbt_cache_bytes:
	.quad KDBT_CACHE_SIZE
