/*
 * smp.elf: a small multi-vCPU guest (ELF64, x86-64), identity-mapped at 1 MiB.
 *
 * Every vCPU i < MAX_VCPUS enters _start with RDI = i, counts itself into
 * vcpus_online, then loops in worker: counters[i] += 1 and a call to its own
 * spin_<i> (a count-down of (i + 1) * SPIN_PASSES iterations). Each vCPU so
 * sits in a distinct function most of the time, which makes vCPUs easy to
 * tell apart as debugger threads. vCPU 0 prints a banner and a line every
 * REPORT_EVERY passes. Runs on the loader's page tables (or the PVH stub's).
 */

	.include "defs.inc"
	.include "xen_elfnote.inc"
	.include "pvh_stub64.inc"

	.equ SPIN_PASSES, 64
	.equ REPORT_EVERY, 1 << 16		/* power of two */

	.cfi_sections .debug_frame
	xen_pvh_notes pvh_start32, .quad

	.text
	.code64
	.globl _start
	.type _start, @function
_start:
	cli
	cld
	xorl %ebp, %ebp
	cmpq $MAX_VCPUS, %rdi
	jae park
	movq %rdi, %rbx			/* RBX = vCPU index from here on */
	leaq 1(%rdi), %rsp
	shlq $STACK_SHIFT, %rsp
	addq $stacks, %rsp
	lock incl vcpus_online
	testq %rbx, %rbx
	jnz worker
	movl $banner, %esi
	call puts
	movq pvh_start_info, %rdi
	testq %rdi, %rdi
	jz worker
	movl $msg_pvh, %esi		/* only on the PVH path: QEMU/Xen */
	call puts
	movq pvh_start_info, %rdi
	call puthex
	movl $msg_newline, %esi
	call puts
	jmp worker
	.size _start, . - _start

	.type park, @function
park:					/* vCPUs >= MAX_VCPUS have no stack */
	cli
	hlt
	jmp park
	.size park, . - park

/* worker: the per-vCPU loop; RBX = vCPU index, never returns. */
	.globl worker
	.type worker, @function
worker:
	.cfi_startproc
	.cfi_undefined rip		/* outermost frame */
	movq counters(, %rbx, 8), %r12
	incq %r12
	movq %r12, counters(, %rbx, 8)
	call *spin_table(, %rbx, 8)
	testq %rbx, %rbx
	jnz worker
	testl $(REPORT_EVERY - 1), %r12d
	jnz worker
	movl $msg_counter, %esi
	call puts
	movq %r12, %rdi
	call puthex
	movl $msg_newline, %esi
	call puts
	jmp worker
	.cfi_endproc
	.size worker, . - worker

/*
 * spin_<n>: vCPU n's private delay loop. A plain count-down without `pause`:
 * QEMU's TCG leaves its translated block on every pause, which is slow.
 */
	.macro spin_fn n
	.globl spin_\n
	.type spin_\n, @function
spin_\n:
	.cfi_startproc
	movl $((\n + 1) * SPIN_PASSES), %ecx
1:	decl %ecx
	jnz 1b
	ret
	.cfi_endproc
	.size spin_\n, . - spin_\n
	.endm

	spin_fn 0
	spin_fn 1
	spin_fn 2
	spin_fn 3

	.include "console64.inc"

	.section .rodata, "a"
	.balign 8
spin_table:
	.quad spin_0, spin_1, spin_2, spin_3
banner:		.asciz "xendbg smp guest: vcpu 0 up\n"
msg_pvh:	.asciz "boot: pvh start_info="
msg_counter:	.asciz "vcpu 0 counter="
msg_newline:	.asciz "\n"

	.data
	.balign 64
	.globl counters, vcpus_online
	.type counters, @object
counters:	.fill MAX_VCPUS, 8, 0	/* uint64_t counters[MAX_VCPUS] */
	.size counters, . - counters
	.type vcpus_online, @object
vcpus_online:	.long 0			/* uint32_t: vCPUs that reached _start */
	.size vcpus_online, 4

	.bss
	.balign PAGE_SIZE
	.globl stacks
	.type stacks, @object
stacks:		.skip MAX_VCPUS * STACK_SIZE
	.size stacks, . - stacks

	.section .note.GNU-stack, "", @progbits
