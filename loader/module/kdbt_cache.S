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

#define KDBT_CACHE_SIZE (8 * 1024 * 1024)
/*
 * Fault-site slots (kernel_dbt/faults.rs): the pages before the last two (the EPT-steering
 * check's), 32 bytes a slot. Each slot has an entry in this module's exception table, so
 * that a fault of the instruction the DBT places there is found by its address; the
 * entries start as EX_TYPE_NONE (the kernel BUGs on a fault there) and the DBT rewrites a
 * slot's fixup and type, through an alias, to those of the instruction's own entry before
 * using the slot. The section is named .text.* because modpost accepts exception-table
 * references only into text sections.
 */
#define KDBT_STEER_PAGES 2
#define KDBT_FAULT_PAGES 64
#define KDBT_FAULT_SLOT 32
#define KDBT_FAULT_SLOTS (KDBT_FAULT_PAGES * 4096 / KDBT_FAULT_SLOT)
#define KDBT_FAULT_OFF (KDBT_CACHE_SIZE - (KDBT_STEER_PAGES + KDBT_FAULT_PAGES) * 4096)

	.section .text.kdbt_cache, "ax", @progbits
	.balign 4096
	.globl kdbt_cache_start
	.type kdbt_cache_start, @object
kdbt_cache_start:
	/* Taken by address, never an indirect-branch target itself (IBT's objtool check). */
	ANNOTATE_NOENDBR
	.fill KDBT_CACHE_SIZE, 1, 0xcc
	.balign 4096

	.pushsection __ex_table, "a"
	.balign 4
	.set kdbt_slot, 0
	.rept KDBT_FAULT_SLOTS
	.long kdbt_cache_start + KDBT_FAULT_OFF + kdbt_slot * KDBT_FAULT_SLOT - .
	.long kdbt_cache_start + KDBT_FAULT_OFF + kdbt_slot * KDBT_FAULT_SLOT - .
	.long 0
	.set kdbt_slot, kdbt_slot + 1
	.endr
	.popsection

	.section .rodata, "a"
	.balign 8
	.globl kdbt_cache_bytes
kdbt_cache_bytes:
	.quad KDBT_CACHE_SIZE
