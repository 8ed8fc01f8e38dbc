/* Corpus functions compiled as real C code (gcc -O2) and run under the DBT. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <immintrin.h>

uint64_t c_switch(uint64_t n) {
    uint64_t acc = 0;
    for (uint64_t i = 0; i < n; i++) {
        switch ((i * 7 + (acc & 3)) % 11) {
        case 0: acc += 3; break;
        case 1: acc ^= i; break;
        case 2: acc = acc * 5 + 1; break;
        case 3: acc -= i * 2; break;
        case 4: acc += acc >> 3; break;
        case 5: acc |= 0x100; break;
        case 6: acc = (acc << 1) | (acc >> 63); break;
        case 7: acc += 77; break;
        case 8: acc *= 3; break;
        case 9: acc ^= 0xdeadbeef; break;
        default: acc += i; break;
        }
    }
    return acc;
}

// Per thread: the corpus also runs on several threads at once (tests/threads.rs).
static _Thread_local jmp_buf jb;
static __attribute__((noinline)) void deep_throw(int depth, int v) {
    if (depth < 0) return;
    if (depth == 0) longjmp(jb, v);
    deep_throw(depth - 1, v + 1);
}
uint64_t c_setjmp(uint64_t n) {
    volatile uint64_t total = 0;
    for (volatile uint64_t i = 0; i < n; i++) {
        int r = setjmp(jb);
        if (r == 0) {
            deep_throw((int)(i % 9), 1);
        } else {
            total += (uint64_t)r;
        }
    }
    return total;
}

static __attribute__((noinline)) uint64_t vsum(int n, ...) {
    va_list ap;
    va_start(ap, n);
    uint64_t s = 0;
    for (int i = 0; i < n; i++) {
        if (i % 3 == 2) s += (uint64_t)(va_arg(ap, double) * 2.0);
        else s += va_arg(ap, uint64_t);
    }
    va_end(ap);
    return s;
}
uint64_t c_varargs(uint64_t n) {
    uint64_t s = 0;
    for (uint64_t i = 0; i < n; i++)
        s += vsum(9, i, i + 1, 1.5 * i, i * 3, i ^ 5, 0.25, 7ul, 8ul, 2.0 * i);
    return s;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}
/* Sorts buf[0..n) in place; returns a checksum of the order. */
uint64_t c_qsort(uint32_t *buf, uint64_t n) {
    qsort(buf, n, sizeof(uint32_t), cmp_u32);
    uint64_t h = 0;
    for (uint64_t i = 0; i < n; i++) h = h * 31 + buf[i];
    return h;
}

/* rep movsb / rep stosq / repne scasb */
uint64_t c_repmovs(uint8_t *dst, const uint8_t *src, uint64_t n) {
    uint64_t c = n;
    __asm__ volatile("rep movsb" : "+D"(dst), "+S"(src), "+c"(c) : : "memory");
    uint64_t q = n / 16;
    uint64_t *d2 = (uint64_t *)(dst);
    (void)d2;
    uint8_t *p = dst - n;
    uint64_t cnt = n;
    uint8_t al = 0x5a;
    __asm__ volatile("repne scasb" : "+D"(p), "+c"(cnt) : "a"(al) : "memory", "cc");
    return q + cnt * 1000 + (uint64_t)(p - (dst - n));
}

__attribute__((target("avx2"))) uint64_t c_simd(const float *a, const float *b, float *out, uint64_t n) {
    __m256 acc = _mm256_setzero_ps();
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(a + i), y = _mm256_loadu_ps(b + i);
        __m256 p = _mm256_add_ps(_mm256_mul_ps(x, y), x);
        _mm256_storeu_ps(out + i, p);
        acc = _mm256_add_ps(acc, p);
    }
    float t[8];
    _mm256_storeu_ps(t, acc);
    __m128 s = _mm_set_ps(t[0] + t[1], t[2] + t[3], t[4] + t[5], t[6] + t[7]);
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    float r = _mm_cvtss_f32(s);
    for (; i < n; i++) r += a[i];
    uint32_t bits;
    memcpy(&bits, &r, 4);
    return bits;
}

typedef uint64_t (*op_fn)(uint64_t, uint64_t);
static uint64_t op_add(uint64_t a, uint64_t b) { return a + b; }
static uint64_t op_mul(uint64_t a, uint64_t b) { return a * b + 1; }
static uint64_t op_xor(uint64_t a, uint64_t b) { return (a ^ b) * 3; }
static op_fn ops[3] = {op_add, op_mul, op_xor};
uint64_t c_fnptr(uint64_t n) {
    uint64_t acc = 1;
    for (uint64_t i = 0; i < n; i++) acc = ops[(acc + i) % 3](acc, i);
    return acc;
}

/* get-PC idiom: call to the next instruction, then pop. */
uint64_t c_getpc(void) {
    uint64_t pc, here;
    __asm__ volatile("call 1f\n1: pop %0\n lea 1b(%%rip), %1" : "=r"(pc), "=r"(here));
    return pc - here; /* 0 natively and under a transparent DBT */
}

/* loop / jrcxz */
uint64_t c_loop(uint64_t n) {
    uint64_t acc = 0, c = n;
    __asm__ volatile(
        "jrcxz 2f\n"
        "1: add %%rcx, %0\n"
        "loop 1b\n"
        "2:\n"
        : "+r"(acc), "+c"(c) : : "cc");
    return acc;
}

/* tail call through a function pointer (jmp *reg at -O2) */
static __attribute__((noinline)) uint64_t tail_target(uint64_t x) { return x * 2 + 1; }
static volatile op_fn dummy;
__attribute__((noinline)) uint64_t c_tail(uint64_t (*f)(uint64_t), uint64_t x) { return f(x + 1); }
uint64_t c_tailcall(uint64_t n) {
    uint64_t s = 0;
    for (uint64_t i = 0; i < n; i++) s += c_tail(tail_target, i);
    return s;
}

/* Callees that pop their stack arguments (`ret imm16`, as stdcall or Pascal code does;
   neither Linux nor SysV code has it): retimm_K sums the K qwords above its return
   address and returns with `ret $8K`. c_retimm(n) calls each n times with K pushed
   arguments; a return that popped the wrong number of bytes would leave rsp off and
   the final `ret` elsewhere. K = 1, 2, 3, 15, 17, 18, 25: on the host (128-byte red
   zone) each of the translator's frame placements (below rsp, the return slot itself,
   above it). */
#define RETIMM_CALLEE(K)                                                                   \
    ".globl retimm_" #K "\n.type retimm_" #K ",@function\nretimm_" #K ":\n"                \
    "xor %eax,%eax\nlea 8(%rsp),%rdx\nmov $" #K ",%ecx\n"                                   \
    "1: add (%rdx),%rax\nadd $8,%rdx\ndec %ecx\njnz 1b\n"                                  \
    "ret $8*" #K "\n"
#define RETIMM_CALL(K)                                                                     \
    "mov $" #K ",%ecx\n1: lea (%rcx,%r9),%rax\npush %rax\ndec %ecx\njnz 1b\n"              \
    "call retimm_" #K "\nadd %rax,%rbx\n"
__asm__(".text\n"
        RETIMM_CALLEE(1) RETIMM_CALLEE(2) RETIMM_CALLEE(3) RETIMM_CALLEE(15)
        RETIMM_CALLEE(17) RETIMM_CALLEE(18) RETIMM_CALLEE(25)
        ".globl c_retimm\n.type c_retimm,@function\nc_retimm:\n"
        "push %rbx\nxor %ebx,%ebx\nmov %rdi,%r9\ntest %r9,%r9\njz 2f\n"
        "3:\n"
        RETIMM_CALL(1) RETIMM_CALL(2) RETIMM_CALL(3) RETIMM_CALL(15)
        RETIMM_CALL(17) RETIMM_CALL(18) RETIMM_CALL(25)
        "dec %r9\njnz 3b\n"
        "2: mov %rbx,%rax\npop %rbx\nret\n");
