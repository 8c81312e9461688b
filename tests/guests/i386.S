/*
 * i386.elf / pae.elf: 32-bit test guests (ELF32, i386). Assembled once
 * without and once with `--defsym PAE=1`.
 *
 * Every vCPU enters _start in flat 32-bit protected mode, paging off, with
 * EDI = its index (or through pvh_start32 under Xen PVH / QEMU). vCPU 0
 * prints a banner and builds the page tables; all vCPUs then enable paging
 * with the same CR3 and run main_loop, which works like longmode.elf's with
 * uint32_t slots and cdecl (stack-passed) arguments.
 *
 * Mappings (both variants):
 *   0x00000000.. -> phys 0, identity: one 4 MiB page (i386) / one 2 MiB page (PAE)
 *   0xc0001000   -> hh_data's physical page, one 4 KiB page
 */

	.include "defs.inc"
	.include "xen_elfnote.inc"

	.equ HH_DATA_VIRT, 0xc0001000	/* keep in sync with i386.ld */
	.equ REPORT_EVERY, 1 << 20	/* power of two */
	.equ GDT_CS32, 0x08
	.equ GDT_DS, 0x10

	.cfi_sections .debug_frame
	xen_pvh_notes pvh_start32, .long

	.text
	.code32

/*
 * PVH entry: EBX = hvm_start_info, other GPRs undefined, and the GDTR may be
 * invalid, so load our own flat GDT before touching SS (first push).
 */
	.globl pvh_start32
	.type pvh_start32, @function
pvh_start32:
	cld
	movl %ebx, pvh_start_info
	lgdt gdt_desc
	ljmp $GDT_CS32, $1f
1:	movl $GDT_DS, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	xorl %edi, %edi			/* the PVH entry is the boot vCPU, index 0 */
	jmp _start
	.size pvh_start32, . - pvh_start32

	.globl _start
	.type _start, @function
_start:
	cli
	cld
	xorl %ebp, %ebp
	cmpl $MAX_VCPUS, %edi
	jae park
	movl %edi, %ebx			/* EBX = vCPU index from here on */
	leal 1(%edi), %esp
	shll $STACK_SHIFT, %esp
	addl $stacks, %esp
	testl %ebx, %ebx
	jnz 2f
	movl $banner, %esi
	call puts
	call build_page_tables
	movl $1, pt_ready
	jmp 3f
2:	pause				/* secondary vCPU: wait for vCPU 0's tables */
	cmpl $0, pt_ready
	je 2b
3:	call enable_paging
	testl %ebx, %ebx
	jnz main_loop
	call boot_report
	jmp main_loop
	.size _start, . - _start

	.type park, @function
park:
	cli
	hlt
	jmp park
	.size park, . - park

.ifndef PAE
/* 32-bit paging: page_dir[0] 4 MiB identity, page_dir[768] -> hh_pt. */
	.globl build_page_tables
	.type build_page_tables, @function
build_page_tables:
	.cfi_startproc
	movl $page_dir, %edi
	movl $((tables_end - page_dir) / 4), %ecx
	xorl %eax, %eax
	rep stosl
	movl $(0 + PTE_P + PTE_RW + PTE_PS), page_dir + 0 * 4
	movl $(hh_pt + PTE_P + PTE_RW), page_dir + (HH_DATA_VIRT >> 22) * 4
	movl $(hh_data_phys + PTE_P + PTE_RW), hh_pt + ((HH_DATA_VIRT >> 12) & 0x3ff) * 4
	ret
	.cfi_endproc
	.size build_page_tables, . - build_page_tables

	.type enable_paging, @function
enable_paging:
	.cfi_startproc
	movl %cr4, %eax
	orl $CR4_PSE, %eax
	movl %eax, %cr4
	movl $page_dir, %eax
	movl %eax, %cr3
	movl %cr0, %eax
	orl $CR0_PG, %eax
	movl %eax, %cr0
	ret
	.cfi_endproc
	.size enable_paging, . - enable_paging

.else
/*
 * PAE paging: pdpt[0] -> pd_low (pd_low[0] 2 MiB identity), pdpt[3] -> pd_hi,
 * pd_hi[0] -> hh_pt. PDPTEs take only P (bits 1, 2, 5-8 are reserved).
 */
	.globl build_page_tables
	.type build_page_tables, @function
build_page_tables:
	.cfi_startproc
	movl $pdpt, %edi
	movl $((tables_end - pdpt) / 4), %ecx
	xorl %eax, %eax
	rep stosl
	movl $(pd_low + PTE_P), pdpt + 0 * 8
	movl $(pd_hi + PTE_P), pdpt + (HH_DATA_VIRT >> 30) * 8
	movl $(0 + PTE_P + PTE_RW + PTE_PS), pd_low + 0 * 8
	movl $(hh_pt + PTE_P + PTE_RW), pd_hi + ((HH_DATA_VIRT >> 21) & 0x1ff) * 8
	movl $(hh_data_phys + PTE_P + PTE_RW), hh_pt + ((HH_DATA_VIRT >> 12) & 0x1ff) * 8
	ret
	.cfi_endproc
	.size build_page_tables, . - build_page_tables

	.type enable_paging, @function
enable_paging:
	.cfi_startproc
	movl %cr4, %eax
	orl $CR4_PAE, %eax
	movl %eax, %cr4
	movl $pdpt, %eax
	movl %eax, %cr3
	movl %cr0, %eax
	orl $CR0_PG, %eax
	movl %eax, %cr0
	ret
	.cfi_endproc
	.size enable_paging, . - enable_paging
.endif

/* main_loop: EBX = vCPU index, ESI = this pass's counter value. */
	.globl main_loop
	.type main_loop, @function
main_loop:
	.cfi_startproc
	.cfi_undefined eip		/* outermost frame */
	pushl %ebx
	call tick
	addl $4, %esp
	movl %eax, %esi
	pushl %eax
	call compute
	addl $4, %esp
	movl %eax, result(, %ebx, 4)
	leal (%esi, %esi, 2), %eax
	movl %eax, watched(, %ebx, 4)
	testl %ebx, %ebx
	jnz main_loop
	testl $(REPORT_EVERY - 1), %esi
	jnz main_loop
	movl %esi, %edi
	movl $msg_counter, %esi
	call puts
	call puthex
	movl $msg_newline, %esi
	call puts
	jmp main_loop
	.cfi_endproc
	.size main_loop, . - main_loop

/* tick(uint32_t index) -> ++counter[index]. cdecl, leaf, no frame. */
	.globl tick
	.type tick, @function
tick:
	.cfi_startproc
	movl 4(%esp), %ecx
	movl counter(, %ecx, 4), %eax
	incl %eax
	movl %eax, counter(, %ecx, 4)
	ret
	.cfi_endproc
	.size tick, . - tick

/* compute(uint32_t x) -> (x + 1)^2 mod 2^32. cdecl with an EBP frame. */
	.globl compute
	.type compute, @function
compute:
	.cfi_startproc
	pushl %ebp
	.cfi_def_cfa_offset 8
	.cfi_offset ebp, -8
	movl %esp, %ebp
	.cfi_def_cfa_register ebp
	movl 8(%ebp), %eax
	incl %eax
	imull %eax, %eax
	popl %ebp
	.cfi_def_cfa esp, 4
	ret
	.cfi_endproc
	.size compute, . - compute

/* boot_report(): vCPU 0's lines once paging is on. */
	.type boot_report, @function
boot_report:
	.cfi_startproc
	movl pvh_start_info, %edi
	testl %edi, %edi
	jz 1f
	movl $msg_pvh, %esi		/* only on the PVH path: QEMU/Xen */
	call puts
	call puthex
	movl $msg_newline, %esi
	call puts
1:	movl $msg_hh, %esi
	call puts
	movl $hh_data, %esi		/* read through the 4 KiB mapping */
	call puts
	movl $msg_newline, %esi
	call puts
	ret
	.cfi_endproc
	.size boot_report, . - boot_report

/* puts(esi = NUL-terminated string). Clobbers eax, esi. */
	.globl puts
	.type puts, @function
puts:
	.cfi_startproc
1:	lodsb
	testb %al, %al
	jz 2f
	outb %al, $DEBUGCON_PORT
	jmp 1b
2:	ret
	.cfi_endproc
	.size puts, . - puts

/* puthex(edi = value): "0x" and 8 hex digits. Clobbers eax, ecx; keeps edi. */
	.globl puthex
	.type puthex, @function
puthex:
	.cfi_startproc
	movb $'0', %al
	outb %al, $DEBUGCON_PORT
	movb $'x', %al
	outb %al, $DEBUGCON_PORT
	movl $8, %ecx
1:	roll $4, %edi
	movl %edi, %eax
	andl $0xf, %eax
	movb hex_digits(%eax), %al
	outb %al, $DEBUGCON_PORT
	decl %ecx
	jnz 1b
	ret
	.cfi_endproc
	.size puthex, . - puthex

	.section .rodata, "a"
banner:
.ifndef PAE
	.asciz "xendbg i386 guest: vcpu 0 up\n"
.else
	.asciz "xendbg pae guest: vcpu 0 up\n"
.endif
msg_pvh:	.asciz "boot: pvh start_info="
msg_hh:		.asciz "hh_data: "
msg_counter:	.asciz "vcpu 0 counter="
msg_newline:	.asciz "\n"
hex_digits:	.ascii "0123456789abcdef"

	.data
	.balign 8
gdt:
	.quad 0				/* null */
	.quad 0x00cf9a000000ffff	/* 0x08: flat 32-bit code */
	.quad 0x00cf92000000ffff	/* 0x10: flat 32-bit data */
gdt_end:
gdt_desc:
	.word gdt_end - gdt - 1
	.long gdt
	.balign 4
	.globl pvh_start_info, pt_ready
	.type pvh_start_info, @object
pvh_start_info:	.long 0		/* hvm_start_info address, 0 unless booted via PVH */
	.size pvh_start_info, 4
	.type pt_ready, @object
pt_ready:	.long 0		/* set to 1 by vCPU 0 once the tables are built */
	.size pt_ready, 4

	.balign 64
	.globl counter, result, watched
	.type counter, @object
counter:	.fill MAX_VCPUS, 4, 0	/* uint32_t counter[MAX_VCPUS] */
	.size counter, . - counter
	.type result, @object
result:		.fill MAX_VCPUS, 4, 0	/* uint32_t result[MAX_VCPUS] */
	.size result, . - result
	.type watched, @object
watched:	.fill MAX_VCPUS, 4, 0	/* uint32_t watched[MAX_VCPUS] */
	.size watched, . - watched

	.bss
	.balign PAGE_SIZE
.ifndef PAE
	.globl page_dir
	.type page_dir, @object
page_dir:	.skip PAGE_SIZE		/* CR3 */
	.size page_dir, PAGE_SIZE
hh_pt:		.skip PAGE_SIZE
.else
	.globl pdpt
	.type pdpt, @object
pdpt:		.skip PAGE_SIZE		/* CR3; only the first 32 bytes are the PDPT */
	.size pdpt, PAGE_SIZE
pd_low:		.skip PAGE_SIZE
pd_hi:		.skip PAGE_SIZE
hh_pt:		.skip PAGE_SIZE
.endif
tables_end:
	.globl stacks
	.type stacks, @object
stacks:		.skip MAX_VCPUS * STACK_SIZE
	.size stacks, . - stacks

/* The 4 KiB page mapped at HH_DATA_VIRT (its own PT_LOAD). */
	.section .hh_data, "aw"
	.globl hh_data
	.type hh_data, @object
hh_data:
	hh_marker
	.size hh_data, . - hh_data
	.balign PAGE_SIZE

	.section .note.GNU-stack, "", @progbits
