/* LD_PRELOAD library that makes this process see an AVX2-only x86 CPU (scripts/avx2-only).
 *
 * Every library picks its kernels from CPUID (torch's cpuinfo, oneDNN, MKL, onnxruntime's MLAS,
 * OpenVINO, numpy), so hiding AVX-512, AVX-VNNI, AVX512-BF16 and AMX from CPUID makes all of
 * them run the code they run on a CPU without those extensions, in one process and its
 * children. Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID; /proc/cpuinfo flag cpuid_fault)
 * turns each CPUID instruction into a SIGSEGV; the handler below runs the real CPUID, clears
 * those bits and resumes after the instruction. The faulting setting is per thread, inherited
 * by new threads and cleared by exec (LD_PRELOAD sets it again in the new program).
 * A SIGSEGV that is not a CPUID goes to the handler the program installed (sigaction is
 * wrapped so that Python's faulthandler and others chain behind this one), else kills it.
 * glibc's signal() does not go through the wrapper: a program installing a SIGSEGV handler
 * with it would replace this one (Python, torch, onnxruntime and OpenVINO do not; gcc's
 * cc1plus does, and crashes under the mask).
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <cpuid.h>
#include <dlfcn.h>
#include <signal.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#define BIT(n) (1u << (n))

static int (*real_sigaction)(int, const struct sigaction *, struct sigaction *);
static struct sigaction program_segv; /* what the program asked for SIGSEGV */
static unsigned long cpuid_traps;

/* Clear what an AVX2-only CPU lacks (Intel SDM / AMD APM, CPUID leaf 7). */
static void hide(unsigned leaf, unsigned sub, unsigned *a, unsigned *b, unsigned *c,
                 unsigned *d) {
    if (leaf == 7 && sub == 0) {
        /* AVX512 F, DQ, IFMA, PF, ER, CD, BW, VL */
        *b &= ~(BIT(16) | BIT(17) | BIT(21) | BIT(26) | BIT(27) | BIT(28) | BIT(30) | BIT(31));
        /* AVX512 VBMI, VBMI2, VNNI, BITALG, VPOPCNTDQ */
        *c &= ~(BIT(1) | BIT(6) | BIT(11) | BIT(12) | BIT(14));
        /* AVX512 4VNNIW, 4FMAPS, VP2INTERSECT, FP16; AMX BF16, TILE, INT8 */
        *d &= ~(BIT(2) | BIT(3) | BIT(8) | BIT(22) | BIT(23) | BIT(24) | BIT(25));
    } else if (leaf == 7 && sub == 1) {
        *a &= ~(BIT(4) | BIT(5) | BIT(21) | BIT(23)); /* AVX-VNNI, AVX512-BF16, AMX-FP16, AVX-IFMA */
        *d &= ~BIT(19);                               /* AVX10 */
    }
}

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (ip[0] == 0x0f && ip[1] == 0xa2) { /* CPUID */
        unsigned a, b, c, d, leaf = (unsigned)r[REG_RAX], sub = (unsigned)r[REG_RCX];
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 1);
        __cpuid_count(leaf, sub, a, b, c, d);
        syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
        hide(leaf, sub, &a, &b, &c, &d);
        r[REG_RAX] = a, r[REG_RBX] = b, r[REG_RCX] = c, r[REG_RDX] = d;
        r[REG_RIP] += 2;
        __atomic_add_fetch(&cpuid_traps, 1, __ATOMIC_RELAXED);
        return;
    }
    if ((program_segv.sa_flags & SA_SIGINFO) && program_segv.sa_sigaction) {
        program_segv.sa_sigaction(sig, info, context);
    } else if (program_segv.sa_handler != SIG_DFL && program_segv.sa_handler != SIG_IGN) {
        program_segv.sa_handler(sig);
    } else {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        real_sigaction(SIGSEGV, &dfl, NULL); /* the fault repeats and ends the process */
    }
}

int sigaction(int sig, const struct sigaction *act, struct sigaction *old) {
    if (!real_sigaction)
        real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    if (sig != SIGSEGV)
        return real_sigaction(sig, act, old);
    if (old)
        *old = program_segv;
    if (act)
        program_segv = *act;
    return 0;
}

/* How many CPUID instructions were answered (for a check that the mask is in place). */
unsigned long cpuid_mask_traps(void) { return cpuid_traps; }

__attribute__((constructor)) static void start(void) {
    struct sigaction sa;
    real_sigaction = dlsym(RTLD_NEXT, "sigaction");
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    real_sigaction(SIGSEGV, &sa, &program_segv);
    syscall(SYS_arch_prctl, ARCH_SET_CPUID, 0);
}
