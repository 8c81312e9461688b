/*
 * pv64.elf: a 64-bit Xen PV test guest (ELF64, x86-64). Xen only: the
 * emulator and QEMU have no PV entry.
 *
 * Boot (xen/include/public/xen.h, "Start-of-day memory layout"): the domain
 * builder loads each PT_LOAD at VIRT_BASE + p_paddr - PADDR_OFFSET, builds
 * page tables that map the image, the start_info page, the console page
 * and a boot stack from VIRT_BASE, fills hypercall_page and enters _start
 * in 64-bit mode (ring 3, event delivery masked) with RSI = the virtual
 * address of start_info. The guest installs no trap table: any exception
 * crashes it (xl's on_crash decides what is left).
 *
 * Console: every string goes to HYPERVISOR_console_io(CONSOLEIO_write),
 * which Xen logs as "(dN) ..." with guest_loglvl=all only when the guest may
 * use it (a debug hypervisor, or the console domain; release builds answer
 * -EPERM), and to the PV console ring of start_info, which xenconsoled
 * reads (`xl console`, or its guest log with --log=guest).
 *
 * Then, like longmode.elf's vCPU 0, forever: counter[0] += 1 (tick);
 * result[0] = (counter[0] + 1)^2 (compute); watched[0] = counter[0] * 3;
 * a line every REPORT_EVERY passes.
 */

	.include "defs.inc"
	.include "xen_elfnote.inc"

	.equ KERNEL_VIRT_BASE, 0xffffffff80000000
	.equ REPORT_EVERY, 1 << 20		/* power of two */

	/* arch-x86/xen-x86_64.h: the read-only machine-to-phys table of PV guests */
	.equ MACH2PHYS_VIRT_START, 0xffff800000000000
	/* xen.h hypercall numbers; each has a 32-byte stub in the hypercall page */
	.equ __HYPERVISOR_console_io, 18
	.equ __HYPERVISOR_sched_op, 29
	.equ __HYPERVISOR_event_channel_op, 32
	.equ CONSOLEIO_write, 0
	.equ SCHEDOP_yield, 0
	.equ EVTCHNOP_send, 4
	/* struct start_info (xen.h), 64-bit offsets */
	.equ SI_console_mfn, 72
	.equ SI_console_evtchn, 80
	/* struct xencons_interface (io/console.h) */
	.equ XENCONS_out, 1024
	.equ XENCONS_out_size, 2048		/* power of two */
	.equ XENCONS_out_cons, 3080
	.equ XENCONS_out_prod, 3084
	.equ RING_FULL_YIELDS, 1000		/* then drop: nobody reads the ring */

	.cfi_sections .debug_frame

	xen_elfnote XEN_ELFNOTE_GUEST_OS, str, "xendbg-test"
	xen_elfnote XEN_ELFNOTE_GUEST_VERSION, str, "1"
	xen_elfnote XEN_ELFNOTE_XEN_VERSION, str, "xen-3.0"
	xen_elfnote XEN_ELFNOTE_LOADER, str, "generic"
	xen_elfnote XEN_ELFNOTE_VIRT_BASE, .quad, KERNEL_VIRT_BASE
	xen_elfnote XEN_ELFNOTE_PADDR_OFFSET, .quad, 0
	xen_elfnote XEN_ELFNOTE_ENTRY, .quad, _start
	xen_elfnote XEN_ELFNOTE_HYPERCALL_PAGE, .quad, hypercall_page

	.text
	.balign PAGE_SIZE
	.globl hypercall_page
	.type hypercall_page, @object
hypercall_page:				/* filled by the domain builder */
	.skip PAGE_SIZE
	.size hypercall_page, PAGE_SIZE

	.globl _start
	.type _start, @function
_start:
	cld
	movq $(stacks + STACK_SIZE), %rsp	/* sign-extended imm32 */
	xorl %ebp, %ebp			/* ends frame-pointer chains */
	movq %rsi, start_info
	call console_init
	movq $banner, %rsi
	call puts
	movq $msg_boot, %rsi
	call puts
	movq start_info, %rdi
	call puthex
	movq $msg_newline, %rsi
	call puts
	movq $msg_data, %rsi
	call puts
	movq $pv_data, %rsi
	call puts
	movq $msg_newline, %rsi
	call puts
	xorl %ebx, %ebx			/* RBX = vCPU index (only vCPU 0 runs) */
	jmp main_loop
	.size _start, . - _start

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

/*
 * console_init(): find the console ring. start_info gives its machine frame;
 * the M2P table turns that into a pseudo-physical frame, which the builder's
 * mapping puts at KERNEL_VIRT_BASE + pfn * 4 KiB (PADDR_OFFSET is 0).
 */
	.type console_init, @function
console_init:
	.cfi_startproc
	movq start_info, %rsi
	movq SI_console_mfn(%rsi), %rax
	movabsq $MACH2PHYS_VIRT_START, %rdx
	movq (%rdx, %rax, 8), %rax
	shlq $12, %rax
	movabsq $KERNEL_VIRT_BASE, %rdx
	addq %rdx, %rax
	movq %rax, cons_ring
	movl SI_console_evtchn(%rsi), %eax
	movl %eax, cons_evtchn
	ret
	.cfi_endproc
	.size console_init, . - console_init

/* console_write(rsi = bytes, rdx = length): both consoles. Keeps rbx, r12. */
	.globl console_write
	.type console_write, @function
console_write:
	.cfi_startproc
	pushq %rbx
	.cfi_adjust_cfa_offset 8
	pushq %r12
	.cfi_adjust_cfa_offset 8
	pushq %r13
	.cfi_adjust_cfa_offset 8
	movq %rsi, %rbx			/* RBX = next byte, R12 = bytes left */
	movq %rdx, %r12
	/* Xen's console (refused on release builds: ignore the result) */
	movl $CONSOLEIO_write, %edi
	movq %r12, %rsi
	movq %rbx, %rdx
	call hypercall_page + __HYPERVISOR_console_io * 32
	/* the PV console ring: out[prod % size] = byte; prod += 1; then notify */
	movq cons_ring, %r8
	testq %r8, %r8
	jz 9f
1:	testq %r12, %r12
	jz 8f
	movl $RING_FULL_YIELDS, %r13d
2:	movl XENCONS_out_prod(%r8), %eax
	movl %eax, %ecx
	subl XENCONS_out_cons(%r8), %ecx
	cmpl $XENCONS_out_size, %ecx
	jb 3f
	decl %r13d			/* full: let xenconsoled run, or give up */
	jz 8f
	movl $SCHEDOP_yield, %edi
	xorl %esi, %esi
	call hypercall_page + __HYPERVISOR_sched_op * 32
	movq cons_ring, %r8
	jmp 2b
3:	movl %eax, %ecx
	andl $(XENCONS_out_size - 1), %ecx
	movb (%rbx), %dl
	movb %dl, XENCONS_out(%r8, %rcx)
	incl %eax			/* x86 keeps stores in order: byte before index */
	movl %eax, XENCONS_out_prod(%r8)
	incq %rbx
	decq %r12
	jmp 1b
8:	subq $8, %rsp			/* struct evtchn_send { evtchn_port_t port; } */
	.cfi_adjust_cfa_offset 8
	movl cons_evtchn, %eax
	movl %eax, (%rsp)
	movl $EVTCHNOP_send, %edi
	movq %rsp, %rsi
	call hypercall_page + __HYPERVISOR_event_channel_op * 32
	addq $8, %rsp
	.cfi_adjust_cfa_offset -8
9:	popq %r13
	.cfi_adjust_cfa_offset -8
	popq %r12
	.cfi_adjust_cfa_offset -8
	popq %rbx
	.cfi_adjust_cfa_offset -8
	ret
	.cfi_endproc
	.size console_write, . - console_write

/* puts(rsi = NUL-terminated string). */
	.globl puts
	.type puts, @function
puts:
	.cfi_startproc
	movq %rsi, %rdx
1:	cmpb $0, (%rdx)
	je 2f
	incq %rdx
	jmp 1b
2:	subq %rsi, %rdx
	jmp console_write		/* tail call */
	.cfi_endproc
	.size puts, . - puts

/* puthex(rdi = value): "0x" and 16 hex digits. */
	.globl puthex
	.type puthex, @function
puthex:
	.cfi_startproc
	movq $hex_buf + 2, %rsi
	movl $16, %ecx
1:	rolq $4, %rdi
	movl %edi, %eax
	andl $0xf, %eax
	movb hex_digits(%rax), %al
	movb %al, (%rsi)
	incq %rsi
	decl %ecx
	jnz 1b
	movq $hex_buf, %rsi
	movl $18, %edx
	jmp console_write		/* tail call */
	.cfi_endproc
	.size puthex, . - puthex

	.section .rodata, "a"
banner:		.asciz "xendbg pv guest: vcpu 0 up\n"
msg_boot:	.asciz "boot: pv start_info="
msg_data:	.asciz "pv_data: "
msg_counter:	.asciz "vcpu 0 counter="
msg_newline:	.asciz "\n"
hex_digits:	.ascii "0123456789abcdef"

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
	.globl pv_data
	.type pv_data, @object
pv_data:	.asciz "PV-GUEST-MARKER"	/* read by debuggers through the PV tables */
	.size pv_data, . - pv_data
	.balign 8
	.globl start_info
	.type start_info, @object
start_info:	.quad 0			/* virtual address of start_info (RSI at entry) */
	.size start_info, 8
	.globl cons_ring
	.type cons_ring, @object
cons_ring:	.quad 0			/* virtual address of the console ring */
	.size cons_ring, 8
	.type cons_evtchn, @object
cons_evtchn:	.long 0
	.size cons_evtchn, 4
hex_buf:	.ascii "0x"
	.skip 16

	.bss
	.balign PAGE_SIZE
	.globl stacks
	.type stacks, @object
stacks:		.skip STACK_SIZE	/* vCPU 0's stack */
	.size stacks, . - stacks

	.section .note.GNU-stack, "", @progbits
