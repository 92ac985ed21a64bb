/* Hide CPU features from a process, so that libraries which pick their kernels from CPUID
 * (onnxruntime's MLAS, oneDNN, OpenVINO) run the code paths of an older CPU natively.
 *
 * Why: an int8 model that is right on this CPU's VNNI or AMX kernels may be wrong on the
 * AVX2 or AVX512-without-VNNI kernels another machine will pick. qemu emulates AVX2 but
 * not AVX512, and emulation is ~100x slower; this runs every kernel at native speed.
 *
 * How: Linux's CPUID faulting (arch_prctl ARCH_SET_CPUID, /proc/cpuinfo flag "cpuid_fault")
 * makes every CPUID instruction of this process trap. The SIGSEGV handler below runs the real
 * CPUID with faulting briefly off, clears the bits named by ISA_MASK_HIDE and resumes after
 * the instruction. The setting is inherited by threads and forks and reset by execve, and
 * this library is loaded by LD_PRELOAD into each new program, so it covers them all.
 *
 * ISA_MASK_HIDE: space-separated /proc/cpuinfo feature names (those in FEATURES below).
 * Build: gcc -O2 -shared -fPIC -o isa_mask.so isa_mask.c
 * Only the instructions' availability as reported by CPUID changes: hidden instructions
 * still execute if a program uses them without asking, which is why the benchmark records
 * which kernels ran by their results, not by trust.
 */
#define _GNU_SOURCE
#include <asm/prctl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

struct feature {
    const char *name;
    uint32_t leaf, subleaf;
    int reg; /* 0 eax, 1 ebx, 2 ecx, 3 edx */
    int bit;
};

/* Intel SDM vol. 2A, CPUID leaf 1 and leaf 7 */
static const struct feature FEATURES[] = {
    {"fma", 1, 0, 2, 12},          {"avx2", 7, 0, 1, 5},
    {"avx512f", 7, 0, 1, 16},      {"avx512dq", 7, 0, 1, 17},
    {"avx512ifma", 7, 0, 1, 21},   {"avx512cd", 7, 0, 1, 28},
    {"avx512bw", 7, 0, 1, 30},     {"avx512vl", 7, 0, 1, 31},
    {"avx512vbmi", 7, 0, 2, 1},    {"avx512_vbmi2", 7, 0, 2, 6},
    {"avx512_vnni", 7, 0, 2, 11},  {"avx512_bitalg", 7, 0, 2, 12},
    {"avx512_vpopcntdq", 7, 0, 2, 14},
    {"avx512_fp16", 7, 0, 3, 23},  {"amx_bf16", 7, 0, 3, 22},
    {"amx_tile", 7, 0, 3, 24},     {"amx_int8", 7, 0, 3, 25},
    {"avx_vnni", 7, 1, 0, 4},      {"avx512_bf16", 7, 1, 0, 5},
};
#define N_FEATURES (sizeof(FEATURES) / sizeof(FEATURES[0]))

static int hidden[N_FEATURES];

static long set_cpuid_enabled(int enabled) { return syscall(SYS_arch_prctl, ARCH_SET_CPUID, enabled); }

static void on_segv(int sig, siginfo_t *info, void *context) {
    ucontext_t *uc = context;
    greg_t *r = uc->uc_mcontext.gregs;
    const unsigned char *ip = (const unsigned char *)r[REG_RIP];
    if (ip[0] != 0x0f || ip[1] != 0xa2) {
        /* a real crash: let it happen as it would have */
        signal(sig, SIG_DFL);
        return;
    }
    uint32_t leaf = (uint32_t)r[REG_RAX], subleaf = (uint32_t)r[REG_RCX], out[4];
    set_cpuid_enabled(1);
    __asm__ volatile("cpuid" : "=a"(out[0]), "=b"(out[1]), "=c"(out[2]), "=d"(out[3]) : "a"(leaf), "c"(subleaf));
    set_cpuid_enabled(0);
    for (size_t i = 0; i < N_FEATURES; i++)
        if (hidden[i] && FEATURES[i].leaf == leaf && FEATURES[i].subleaf == subleaf)
            out[FEATURES[i].reg] &= ~(1u << FEATURES[i].bit);
    r[REG_RAX] = out[0];
    r[REG_RBX] = out[1];
    r[REG_RCX] = out[2];
    r[REG_RDX] = out[3];
    r[REG_RIP] += 2;
    (void)info;
}

__attribute__((constructor)) static void isa_mask_init(void) {
    const char *hide = getenv("ISA_MASK_HIDE");
    if (!hide || !*hide)
        return;
    char names[1024];
    snprintf(names, sizeof names, "%s", hide);
    for (char *save = NULL, *name = strtok_r(names, " ,", &save); name; name = strtok_r(NULL, " ,", &save)) {
        size_t i = 0;
        while (i < N_FEATURES && strcmp(FEATURES[i].name, name) != 0)
            i++;
        if (i == N_FEATURES) {
            fprintf(stderr, "isa_mask: unknown feature %s in ISA_MASK_HIDE\n", name);
            _exit(3);
        }
        hidden[i] = 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigaction(SIGSEGV, &sa, NULL);
    if (set_cpuid_enabled(0) != 0) {
        perror("isa_mask: arch_prctl(ARCH_SET_CPUID, 0) (needs the cpuid_fault CPU flag)");
        _exit(3);
    }
}
