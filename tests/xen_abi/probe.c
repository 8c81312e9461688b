/*
 * Print the layout of every Xen structure and field xendbg's ctypes bindings
 * use, as the C compiler sees it with the installed Xen headers (libxen-dev).
 * tests/test_xen_abi.py compiles this, runs it and compares each line with
 * the ctypes definitions of src/xendbg/backend/xen/structs.py.
 *
 * Output lines:
 *   V <name> <value>                   a constant
 *   S <struct> <sizeof>
 *   O <struct> <field.path> <offsetof> <sizeof field>
 *
 * The vm_event part follows VM_EVENT_INTERFACE_VERSION, so the probe also
 * builds against the headers of older Xen releases (interface 3 to 7).
 */
#define __XEN_TOOLS__ 1
#include <stddef.h>
#include <stdio.h>
#include <xenctrl.h>
#include <xen/hvm/save.h>
#include <xen/vm_event.h>

#define S(T, name) printf("S %s %zu\n", name, sizeof(T));
#define O(T, name, f) \
    printf("O %s %s %zu %zu\n", name, #f, offsetof(T, f), sizeof(((T *)0)->f));
#define V(name, value) printf("V %s %lld\n", name, (long long)(value));

/* ---- HVM save records ---------------------------------------------------- */
#define DESC(X) X(typecode) X(instance) X(length)
#define O_DESC(f) O(struct hvm_save_descriptor, "hvm_save_descriptor", f)

#define HEADER(X) X(magic) X(version) X(changeset) X(cpuid) X(gtsc_khz)
#define O_HEADER(f) O(struct hvm_save_header, "hvm_save_header", f)

#define CPU(X)                                                                 \
    X(fpu_regs) X(rax) X(rbx) X(rcx) X(rdx) X(rbp) X(rsi) X(rdi) X(rsp)        \
    X(r8) X(r9) X(r10) X(r11) X(r12) X(r13) X(r14) X(r15) X(rip) X(rflags)    \
    X(cr0) X(cr2) X(cr3) X(cr4) X(dr0) X(dr1) X(dr2) X(dr3) X(dr6) X(dr7)    \
    X(cs_sel) X(ds_sel) X(es_sel) X(fs_sel) X(gs_sel) X(ss_sel) X(tr_sel)     \
    X(ldtr_sel) X(cs_limit) X(ds_limit) X(es_limit) X(fs_limit) X(gs_limit)   \
    X(ss_limit) X(tr_limit) X(ldtr_limit) X(idtr_limit) X(gdtr_limit)         \
    X(cs_base) X(ds_base) X(es_base) X(fs_base) X(gs_base) X(ss_base)         \
    X(tr_base) X(ldtr_base) X(idtr_base) X(gdtr_base) X(cs_arbytes)           \
    X(ds_arbytes) X(es_arbytes) X(fs_arbytes) X(gs_arbytes) X(ss_arbytes)     \
    X(tr_arbytes) X(ldtr_arbytes) X(sysenter_cs) X(sysenter_esp)              \
    X(sysenter_eip) X(shadow_gs) X(msr_flags) X(msr_lstar) X(msr_star)        \
    X(msr_cstar) X(msr_syscall_mask) X(msr_efer) X(msr_tsc_aux) X(tsc)        \
    X(pending_event) X(error_code) X(flags) X(pad0)
#define O_CPU(f) O(struct hvm_hw_cpu, "hvm_hw_cpu", f)

/* ---- PV vCPU context ----------------------------------------------------- */
#define UREGS64(X)                                                             \
    X(r15) X(r14) X(r13) X(r12) X(rbp) X(rbx) X(r11) X(r10) X(r9) X(r8)       \
    X(rax) X(rcx) X(rdx) X(rsi) X(rdi) X(error_code) X(entry_vector) X(rip)   \
    X(cs) X(saved_upcall_mask) X(rflags) X(rsp) X(ss) X(es) X(ds) X(fs) X(gs)
#define O_UREGS64(f) O(struct cpu_user_regs_x86_64, "cpu_user_regs_x86_64", f)

#define UREGS32(X)                                                             \
    X(ebx) X(ecx) X(edx) X(esi) X(edi) X(ebp) X(eax) X(error_code)            \
    X(entry_vector) X(eip) X(cs) X(saved_upcall_mask) X(eflags) X(esp) X(ss)  \
    X(es) X(ds) X(fs) X(gs)
#define O_UREGS32(f) O(struct cpu_user_regs_x86_32, "cpu_user_regs_x86_32", f)

#define TRAP(X) X(vector) X(flags) X(cs) X(address)
#define O_TRAP64(f) O(struct trap_info_x86_64, "trap_info_x86_64", f)
#define O_TRAP32(f) O(struct trap_info_x86_32, "trap_info_x86_32", f)

#define VGC_COMMON(X)                                                          \
    X(fpu_ctxt) X(flags) X(user_regs) X(trap_ctxt) X(ldt_base) X(ldt_ents)    \
    X(gdt_frames) X(gdt_ents) X(kernel_ss) X(kernel_sp) X(ctrlreg)            \
    X(debugreg) X(event_callback_eip) X(failsafe_callback_eip) X(vm_assist)
#define VGC64(X)                                                               \
    VGC_COMMON(X) X(syscall_callback_eip) X(fs_base) X(gs_base_kernel)        \
    X(gs_base_user)
#define VGC32(X) VGC_COMMON(X) X(event_callback_cs) X(failsafe_callback_cs)
#define O_VGC64(f) O(vcpu_guest_context_x86_64_t, "vcpu_guest_context_x86_64", f)
#define O_VGC32(f) O(vcpu_guest_context_x86_32_t, "vcpu_guest_context_x86_32", f)

/* ---- domain information -------------------------------------------------- */
#define DOMINFO(X)                                                             \
    X(domain) X(flags) X(tot_pages) X(max_pages) X(outstanding_pages)         \
    X(shr_pages) X(paged_pages) X(shared_info_frame) X(cpu_time)              \
    X(nr_online_vcpus) X(max_vcpu_id) X(ssidref) X(handle) X(cpupool)         \
    X(gpaddr_bits) X(arch_config) X(arch_config.emulation_flags)              \
    X(arch_config.misc_flags)
#define O_DOMINFO(f) O(xc_domaininfo_t, "xen_domctl_getdomaininfo", f)

/* ---- vm_event ring and messages ------------------------------------------ */
#define SRING(X) X(req_prod) X(req_event) X(rsp_prod) X(rsp_event) X(pvt) X(ring)
#define O_SRING(f) O(vm_event_sring_t, "vm_event_sring", f)

#define ST(X)                                                                  \
    X(version) X(flags) X(reason) X(vcpu_id) X(altp2m_idx) X(u) X(data)       \
    X(u.mem_access.gfn) X(u.mem_access.offset) X(u.mem_access.gla)            \
    X(u.mem_access.flags) X(u.write_ctrlreg.index)                            \
    X(u.write_ctrlreg.new_value) X(u.write_ctrlreg.old_value)                 \
    X(u.mov_to_msr.msr) X(u.mov_to_msr.new_value) X(u.mov_to_msr.old_value)   \
    X(u.singlestep.gfn) X(u.software_breakpoint.gfn)                          \
    X(u.software_breakpoint.insn_length) X(u.software_breakpoint.type)        \
    X(u.debug_exception.gfn) X(u.debug_exception.insn_length)                 \
    X(u.debug_exception.type) X(u.cpuid.insn_length) X(u.cpuid.leaf)          \
    X(u.cpuid.subleaf) X(u.mem_paging.gfn) X(data.regs.x86)
#define O_ST(f) O(vm_event_request_t, "vm_event_st", f)

#define REGS_COMMON(X)                                                         \
    X(rax) X(rcx) X(rdx) X(rbx) X(rsp) X(rbp) X(rsi) X(rdi) X(r8) X(r9)       \
    X(r10) X(r11) X(r12) X(r13) X(r14) X(r15) X(rflags) X(dr7) X(rip) X(cr0)  \
    X(cr2) X(cr3) X(cr4) X(sysenter_cs) X(sysenter_esp) X(sysenter_eip)       \
    X(msr_efer) X(msr_star) X(msr_lstar) X(fs_base) X(gs_base)
#define REGS_V4(X)                                                             \
    X(dr6) X(cs_base) X(ss_base) X(ds_base) X(es_base) X(cs) X(ss) X(ds)      \
    X(es) X(fs) X(gs) X(shadow_gs) X(cs_sel) X(ss_sel) X(ds_sel) X(es_sel)    \
    X(fs_sel) X(gs_sel)
#define O_REGS(f) O(struct vm_event_regs_x86, "vm_event_regs_x86", f)
#define O_DEBUG(f) O(struct vm_event_debug, "vm_event_debug", f)

int main(void)
{
    V("HVM_SAVE_CODE_END", HVM_SAVE_CODE(END))
    V("HVM_SAVE_CODE_HEADER", HVM_SAVE_CODE(HEADER))
    V("HVM_SAVE_CODE_CPU", HVM_SAVE_CODE(CPU))
    V("HVM_FILE_MAGIC", HVM_FILE_MAGIC)
    V("VM_EVENT_INTERFACE_VERSION", VM_EVENT_INTERFACE_VERSION)
    V("XEN_DOMCTL_INTERFACE_VERSION", XEN_DOMCTL_INTERFACE_VERSION)

    S(struct hvm_save_descriptor, "hvm_save_descriptor") DESC(O_DESC)
    S(struct hvm_save_header, "hvm_save_header") HEADER(O_HEADER)
    S(struct hvm_hw_cpu, "hvm_hw_cpu") CPU(O_CPU)

    S(struct cpu_user_regs_x86_64, "cpu_user_regs_x86_64") UREGS64(O_UREGS64)
    S(struct trap_info_x86_64, "trap_info_x86_64") TRAP(O_TRAP64)
    S(vcpu_guest_context_x86_64_t, "vcpu_guest_context_x86_64") VGC64(O_VGC64)
    S(struct cpu_user_regs_x86_32, "cpu_user_regs_x86_32") UREGS32(O_UREGS32)
    S(struct trap_info_x86_32, "trap_info_x86_32") TRAP(O_TRAP32)
    S(vcpu_guest_context_x86_32_t, "vcpu_guest_context_x86_32") VGC32(O_VGC32)
    S(vcpu_guest_context_any_t, "vcpu_guest_context_any")

    S(xc_domaininfo_t, "xen_domctl_getdomaininfo") DOMINFO(O_DOMINFO)

    S(vm_event_sring_t, "vm_event_sring") SRING(O_SRING)
    S(union vm_event_sring_entry, "vm_event_sring_entry")
    S(vm_event_request_t, "vm_event_st") ST(O_ST)
    S(struct vm_event_regs_x86, "vm_event_regs_x86") REGS_COMMON(O_REGS)
#if VM_EVENT_INTERFACE_VERSION >= 4
    REGS_V4(O_REGS)
#else
    O_REGS(cs_arbytes)
#endif
#if VM_EVENT_INTERFACE_VERSION >= 5
    O_REGS(gdtr_base) O_REGS(gdtr_limit)
#endif
#if VM_EVENT_INTERFACE_VERSION >= 7
    O_REGS(npt_base) O_REGS(vmtrace_pos)
#endif
    S(struct vm_event_debug, "vm_event_debug")
    O_DEBUG(gfn) O_DEBUG(insn_length) O_DEBUG(type)
#if VM_EVENT_INTERFACE_VERSION >= 6
    O_DEBUG(pending_dbg)
#endif
#if VM_EVENT_INTERFACE_VERSION >= 4
    S(struct vm_event_x86_selector_reg, "vm_event_x86_selector_reg")
#endif
    return 0;
}
