/*
 * longmode.elf: the main xendbg test guest (ELF64, x86-64).
 *
 * Boot: every vCPU enters _start in 64-bit mode on the loader's identity map
 * with RDI = its index (or through pvh_start32 under Xen PVH / QEMU). vCPU 0
 * prints a banner, builds its own 4-level page tables and publishes them; the
 * other vCPUs wait for them. Every vCPU then loads kernel_pml4 into CR3 and
 * jumps to the higher-half alias of the kernel (KERNEL_VIRT_BASE + physical),
 * where main_loop runs forever.
 *
 * Page tables built here (kernel_pml4, in .boot.bss):
 *   0x0000000000000000..0x000000003fffffff -> phys 0, 512 x 2 MiB (identity)
 *   0xffffffff80000000..0xffffffff801fffff -> phys 0, one 2 MiB page (kernel)
 *   0xffff800000001000..0xffff800000001fff -> hh_data's physical page (4 KiB)
 *
 * Per vCPU i (arrays of uint64_t, MAX_VCPUS slots), each main_loop pass:
 *   counter[i] += 1 (tick); result[i] = (counter[i] + 1)^2 (compute);
 *   watched[i] = counter[i] * 3. vCPU 0 prints a line every REPORT_EVERY passes.
 */

	.include "defs.inc"
	.include "xen_elfnote.inc"
	.include "pvh_stub64.inc"

	.equ KERNEL_VIRT_BASE, 0xffffffff80000000
	.equ REPORT_EVERY, 1 << 20		/* power of two */

	.cfi_sections .debug_frame
	xen_pvh_notes pvh_start32, .quad

/* ---------------------------------------------------------------------- */
/* Identity-mapped boot code (VMA == LMA, about 1 MiB)                     */
/* ---------------------------------------------------------------------- */

	.section .boot.text, "ax"
	.code64
	.globl _start
	.type _start, @function
_start:
	cli
	cld
	xorl %ebp, %ebp			/* ends frame-pointer chains */
	cmpq $MAX_VCPUS, %rdi
	jae park
	movq %rdi, %rbx			/* RBX = vCPU index from here on */

	/* Stack top of stacks[i], by physical address until the switch. */
	leaq 1(%rdi), %rax
	shlq $STACK_SHIFT, %rax
	addq $stacks_phys, %rax
	movq %rax, %rsp

	testq %rbx, %rbx
	jnz 2f
	movl $banner, %esi
	call early_puts
	call build_page_tables
	movl $1, pt_ready		/* x86 stores are not reordered with earlier stores */
	jmp 3f
2:	pause				/* secondary vCPU: wait for vCPU 0's tables */
	cmpl $0, pt_ready
	je 2b

3:	movq $kernel_pml4, %rax
	movq %rax, %cr3
	movq $high_entry, %rax		/* sign-extended imm32: 0xffffffff801xxxxx */
	jmp *%rax
	.size _start, . - _start

	.type park, @function
park:					/* vCPUs >= MAX_VCPUS have no stack */
	cli
	hlt
	jmp park
	.size park, . - park

/* early_puts(rsi): console output before the higher half is mapped. */
	.type early_puts, @function
early_puts:
	.cfi_startproc
1:	lodsb
	testb %al, %al
	jz 2f
	outb %al, $DEBUGCON_PORT
	jmp 1b
2:	ret
	.cfi_endproc
	.size early_puts, . - early_puts

/* build_page_tables(): fill the kernel_* tables described at the top. */
	.globl build_page_tables
	.type build_page_tables, @function
build_page_tables:
	.cfi_startproc
	movl $kernel_pml4, %edi		/* zero all table pages first */
	movl $((kernel_tables_end - kernel_pml4) / 8), %ecx
	xorl %eax, %eax
	rep stosq

	/* Identity: PML4[0] -> PDPT[0] -> PD[0..511], 2 MiB pages */
	movq $(ident_pdpt + PTE_P + PTE_RW), %rax
	movq %rax, kernel_pml4 + 0 * 8
	movq $(ident_pd + PTE_P + PTE_RW), %rax
	movq %rax, ident_pdpt + 0 * 8
	movl $ident_pd, %edi
	movl $(PTE_P + PTE_RW + PTE_PS), %eax
	movl $512, %ecx
1:	movq %rax, (%rdi)
	addq $0x200000, %rax
	addq $8, %rdi
	loop 1b

	/* Kernel: 0xffffffff80000000 = PML4[511] PDPT[510] PD[0] -> phys 0 */
	movq $(kern_pdpt + PTE_P + PTE_RW), %rax
	movq %rax, kernel_pml4 + 511 * 8
	movq $(kern_pd + PTE_P + PTE_RW), %rax
	movq %rax, kern_pdpt + 510 * 8
	movq $(0 + PTE_P + PTE_RW + PTE_PS), %rax
	movq %rax, kern_pd + 0 * 8

	/* hh_data: 0xffff800000001000 = PML4[256] PDPT[0] PD[0] PT[1], 4 KiB */
	movq $(hh_pdpt + PTE_P + PTE_RW), %rax
	movq %rax, kernel_pml4 + 256 * 8
	movq $(hh_pd + PTE_P + PTE_RW), %rax
	movq %rax, hh_pdpt + 0 * 8
	movq $(hh_pt + PTE_P + PTE_RW), %rax
	movq %rax, hh_pd + 0 * 8
	movq $(hh_data_phys + PTE_P + PTE_RW), %rax
	movq %rax, hh_pt + 1 * 8
	ret
	.cfi_endproc
	.size build_page_tables, . - build_page_tables

	.section .boot.rodata, "a"
banner:
	.asciz "xendbg test guest: vcpu 0 up\n"

	.section .boot.data, "aw"
	.balign 4
	.globl pt_ready
	.type pt_ready, @object
pt_ready:				/* set to 1 by vCPU 0 once kernel_pml4 is built */
	.long 0
	.size pt_ready, 4

	.section .boot.bss, "aw", @nobits
	.balign PAGE_SIZE
	.globl kernel_pml4
	.type kernel_pml4, @object
kernel_pml4:	.skip PAGE_SIZE
	.size kernel_pml4, PAGE_SIZE
ident_pdpt:	.skip PAGE_SIZE
ident_pd:	.skip PAGE_SIZE
kern_pdpt:	.skip PAGE_SIZE
kern_pd:	.skip PAGE_SIZE
hh_pdpt:	.skip PAGE_SIZE
hh_pd:		.skip PAGE_SIZE
hh_pt:		.skip PAGE_SIZE
kernel_tables_end:

/* ---------------------------------------------------------------------- */
/* Higher-half kernel (VMA = KERNEL_VIRT_BASE + LMA)                        */
/* ---------------------------------------------------------------------- */

	.text
	.type high_entry, @function
high_entry:
	movq $KERNEL_VIRT_BASE, %rax
	addq %rax, %rsp			/* same stack, through the kernel alias */
	testq %rbx, %rbx
	jnz main_loop
	call boot_report
	/* fall through */
	.size high_entry, . - high_entry

/* main_loop: RBX = vCPU index, R12 = this pass's counter value. */
	.globl main_loop
	.type main_loop, @function
main_loop:
	.cfi_startproc
	.cfi_undefined rip		/* outermost frame */
	movq %rbx, %rdi
	call tick
	movq %rax, %r12
	movq %rax, %rdi
	call compute
	movq %rax, result(, %rbx, 8)
	leaq (%r12, %r12, 2), %rax
	movq %rax, watched(, %rbx, 8)
	testq %rbx, %rbx
	jnz main_loop
	testl $(REPORT_EVERY - 1), %r12d
	jnz main_loop
	movq $msg_counter, %rsi
	call puts
	movq %r12, %rdi
	call puthex
	movq $msg_newline, %rsi
	call puts
	jmp main_loop
	.cfi_endproc
	.size main_loop, . - main_loop

	.include "work64.inc"

/* boot_report(): vCPU 0's lines once running in the higher half. */
	.type boot_report, @function
boot_report:
	.cfi_startproc
	movq pvh_start_info, %rdi
	testq %rdi, %rdi
	jz 1f
	movq $msg_pvh, %rsi		/* only on the PVH path: QEMU/Xen */
	call puts
	movq pvh_start_info, %rdi
	call puthex
	movq $msg_newline, %rsi
	call puts
1:	movq $msg_hh, %rsi
	call puts
	movabsq $hh_data, %rsi		/* read through the 4 KiB higher-half mapping */
	call puts
	movq $msg_newline, %rsi
	call puts
	ret
	.cfi_endproc
	.size boot_report, . - boot_report

	.include "console64.inc"

	.section .rodata, "a"
msg_pvh:	.asciz "boot: pvh start_info="
msg_hh:		.asciz "hh_data: "
msg_counter:	.asciz "vcpu 0 counter="
msg_newline:	.asciz "\n"

	.data
	.balign 64
	.globl counter, result, watched
	.type counter, @object
counter:	.fill MAX_VCPUS, 8, 0	/* uint64_t counter[MAX_VCPUS] */
	.size counter, . - counter
	.type result, @object
result:		.fill MAX_VCPUS, 8, 0	/* uint64_t result[MAX_VCPUS] */
	.size result, . - result
	.type watched, @object
watched:	.fill MAX_VCPUS, 8, 0	/* uint64_t watched[MAX_VCPUS] */
	.size watched, . - watched

	.bss
	.balign PAGE_SIZE
	.globl stacks
	.type stacks, @object
stacks:		.skip MAX_VCPUS * STACK_SIZE	/* stacks[i] top = stacks + (i+1)*STACK_SIZE */
	.size stacks, . - stacks

/* The 4 KiB page mapped at 0xffff800000001000 (its own PT_LOAD). */
	.section .hh_data, "aw"
	.globl hh_data
	.type hh_data, @object
hh_data:
	hh_marker
	.size hh_data, . - hh_data
	.balign PAGE_SIZE

	.section .note.GNU-stack, "", @progbits
