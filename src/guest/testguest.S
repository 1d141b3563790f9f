/*
 * stasis built-in test guest.
 *
 * Entered per the Linux 64-bit boot protocol: long mode, CPL0, rsi = boot_params.
 * The ring-0 stub is a few dozen instructions (ring-0 code is emulated on
 * some hosts at ~1 us/instruction): it identity-maps all RAM named in the e820
 * map with 2 MiB user pages, loads a GDT with user segments, and iretq's to
 * ring 3 with IOPL=3.  Everything else runs in ring 3 at native speed:
 *
 *   cmdline  stasis.mib=N stasis.rounds=R stasis.seed=S stasis.report=K
 *            stasis.base=B (MiB; where the work memory starts, default 16)
 *            stasis.hot=H (MiB; rounds touch only the first H MiB of the work
 *            memory, 0 = all of it, the default)
 *   fill     x = seed|1; for each qword i of the work memory: xorshift64(x); m[i] = x
 *   round r  (r = 1..R, R = 0: forever) for each page p (p < H*256 if H > 0):
 *              j = p*512 + ((r*7 + p) & 511)
 *              v = m[j] * 0x9E3779B97F4A7C15 + r; m[j] = v
 *              acc = (acc ^ v) * 0x100000001B3
 *   final    h = acc; for each qword i: h = (h ^ m[i]) * 0x100000001B3
 *
 * acc starts at 0xcbf29ce484222325.  Work memory is the usable e820 RAM at
 * or above B MiB, in map order, taken up to N MiB.  Progress goes to the
 * status page at physical 0x5000 after every round and, every K rounds, to
 * the serial port; the end result is printed as "checksum=<hex>" and the
 * guest exits by writing 0 to port 0xf4 (2 if it lacks memory).
 */
        .intel_syntax noprefix

        .set STATUS,       0x5000       /* status page: see src/guest/mod.rs */
        .set COM1,         0x3f8
        .set EXIT_PORT,    0xf4
        .set FNV_PRIME,    0x100000001B3
        .set FNV_BASIS,    0xcbf29ce484222325
        .set GOLDEN,       0x9E3779B97F4A7C15
        .set PTE_FLAGS,    0x87          /* present | rw | user | 2 MiB */
        .set TBL_FLAGS,    0x07          /* present | rw | user */
        .set MAX_GIB,      64

        .text
        .code64
        .globl _start
_start:
        /* ---- ring 0: find the end of RAM from the e820 map ---- */
        mov     r15, rsi                 /* boot_params, kept for ring 3 */
        movzx   ecx, byte ptr [rsi + 0x1e8]
        lea     rdi, [rsi + 0x2d0]
        xor     r8d, r8d                 /* highest end of RAM */
1:      test    ecx, ecx
        jz      2f
        mov     rax, [rdi]
        add     rax, [rdi + 8]
        cmp     rax, r8
        cmova   r8, rax
        add     rdi, 20
        dec     ecx
        jmp     1b
2:      /* number of 2 MiB pages, capped at MAX_GIB */
        add     r8, 0x1fffff
        shr     r8, 21
        mov     rax, MAX_GIB * 512
        cmp     r8, rax
        cmova   r8, rax
        /* PD entries: identity 2 MiB pages (tables are in fresh, zeroed memory) */
        lea     rdi, [rip + pd]
        mov     eax, PTE_FLAGS
        mov     rcx, r8
3:      mov     [rdi], rax
        add     rax, 0x200000
        add     rdi, 8
        dec     rcx
        jnz     3b
        /* PDPT entries: one per GiB */
        lea     rdi, [rip + pdpt]
        lea     rax, [rip + pd + TBL_FLAGS]
        add     r8, 511
        shr     r8, 9
4:      mov     [rdi], rax
        add     rax, 4096
        add     rdi, 8
        dec     r8
        jnz     4b
        lea     rax, [rip + pdpt + TBL_FLAGS]
        mov     [rip + pml4], rax
        lea     rax, [rip + pml4]
        mov     cr3, rax
        lgdt    [rip + gdt_desc]
        /* iretq to ring 3: ss, rsp, rflags (IOPL=3, IF=0), cs, rip */
        push    0x1b
        lea     rax, [rip + stack_top]
        push    rax
        push    0x3002
        push    0x23
        lea     rax, [rip + user_main]
        push    rax
        iretq

/* ------------------------------------------------------------------ ring 3 */
user_main:
        mov     qword ptr [STATUS + 8], 0      /* round */
        mov     qword ptr [STATUS + 32], 1     /* phase: parsing */
        mov     rax, 0x5355544154535453         /* "STSTATUS" */
        mov     [STATUS], rax

        /* defaults */
        mov     qword ptr [rip + p_mib], 16
        mov     qword ptr [rip + p_rounds], 4
        mov     qword ptr [rip + p_seed], 1
        mov     qword ptr [rip + p_report], 1
        mov     qword ptr [rip + p_base], 16
        mov     qword ptr [rip + p_hot], 0

        mov     esi, dword ptr [r15 + 0x228]   /* cmd_line_ptr */
        test    esi, esi
        jz      parsed
        lea     rdi, [rip + k_mib]
        lea     rbx, [rip + p_mib]
        call    find_param
        lea     rdi, [rip + k_rounds]
        lea     rbx, [rip + p_rounds]
        call    find_param
        lea     rdi, [rip + k_seed]
        lea     rbx, [rip + p_seed]
        call    find_param
        lea     rdi, [rip + k_report]
        lea     rbx, [rip + p_report]
        call    find_param
        lea     rdi, [rip + k_base]
        lea     rbx, [rip + p_base]
        call    find_param
        lea     rdi, [rip + k_hot]
        lea     rbx, [rip + p_hot]
        call    find_param
parsed:
        lea     rsi, [rip + s_hello]
        call    puts
        mov     rax, [rip + p_mib]
        call    putdec
        lea     rsi, [rip + s_rounds]
        call    puts
        mov     rax, [rip + p_rounds]
        call    putdec
        lea     rsi, [rip + s_seed]
        call    puts
        mov     rax, [rip + p_seed]
        call    puthex
        mov     al, 10
        call    putc

        /* ---- build the segment list from e820 (type 1, clipped to >= WORK_BASE) ---- */
        mov     r14, [rip + p_mib]
        shl     r14, 20                 /* bytes still wanted */
        movzx   ecx, byte ptr [r15 + 0x1e8]
        lea     rsi, [r15 + 0x2d0]
        lea     rdi, [rip + segs]
        xor     r13d, r13d              /* segment count */
seg_loop:
        test    ecx, ecx
        jz      seg_done
        test    r14, r14
        jz      seg_done
        cmp     dword ptr [rsi + 16], 1
        jne     seg_next
        mov     rax, [rsi]              /* start */
        mov     rdx, rax
        add     rdx, [rsi + 8]          /* end */
        mov     r8, [rip + p_base]
        shl     r8, 20
        cmp     rax, r8
        cmovb   rax, r8
        add     rax, 4095
        and     rax, -4096
        and     rdx, -4096
        cmp     rdx, rax
        jbe     seg_next
        sub     rdx, rax                /* length */
        cmp     rdx, r14
        cmova   rdx, r14
        mov     [rdi], rax
        mov     [rdi + 8], rdx
        add     rdi, 16
        sub     r14, rdx
        inc     r13
        cmp     r13, 32
        je      seg_done
seg_next:
        add     rsi, 20
        dec     ecx
        jmp     seg_loop
seg_done:
        mov     [rip + nsegs], r13
        test    r14, r14
        jz      have_mem
        lea     rsi, [rip + s_nomem]
        call    puts
        mov     eax, 2
        out     EXIT_PORT, al
        jmp     .

have_mem:
        /* ---- fill ---- */
        mov     qword ptr [STATUS + 32], 2     /* phase: fill */
        mov     rax, [rip + p_seed]
        or      rax, 1
        lea     r12, [rip + segs]
        mov     r13, [rip + nsegs]
fill_seg:
        mov     rdi, [r12]
        mov     rcx, [r12 + 8]
        shr     rcx, 3
fill_q:
        mov     rdx, rax
        shl     rdx, 13
        xor     rax, rdx
        mov     rdx, rax
        shr     rdx, 7
        xor     rax, rdx
        mov     rdx, rax
        shl     rdx, 17
        xor     rax, rdx
        mov     [rdi], rax
        add     rdi, 8
        dec     rcx
        jnz     fill_q
        add     r12, 16
        dec     r13
        jnz     fill_seg

        /* ---- rounds ---- */
        mov     qword ptr [STATUS + 32], 3     /* phase: rounds */
        mov     r10, FNV_BASIS          /* acc */
        mov     r11, FNV_PRIME
        mov     r9, GOLDEN
        xor     ebp, ebp                /* r: completed rounds */
        mov     r14, [rip + p_hot]
        shl     r14, 8                  /* pages a round touches */
        test    r14, r14
        jnz     hot_set
        mov     r14, -1                 /* all of them */
hot_set:
round_loop:
        mov     rax, [rip + p_rounds]
        test    rax, rax
        jz      1f
        cmp     rbp, rax
        jae     rounds_done
1:      inc     rbp
        xor     r8d, r8d                /* p: logical page index */
        lea     r12, [rip + segs]
        mov     r13, [rip + nsegs]
        lea     rbx, [rbp + rbp * 8]
        sub     rbx, rbp
        sub     rbx, rbp                /* rbx = 7r */
rseg:
        mov     rsi, [r12]              /* page address */
        mov     rcx, [r12 + 8]
        shr     rcx, 12                 /* pages in segment */
rpage:
        lea     rax, [rbx + r8]
        and     eax, 511
        mov     rdx, [rsi + rax * 8]
        imul    rdx, r9
        add     rdx, rbp
        mov     [rsi + rax * 8], rdx
        xor     r10, rdx
        imul    r10, r11
        inc     r8
        cmp     r8, r14
        jae     round_pub
        add     rsi, 4096
        dec     rcx
        jnz     rpage
        add     r12, 16
        dec     r13
        jnz     rseg
round_pub:
        /* publish progress: acc first, then the round */
        mov     [STATUS + 16], r10
        mov     [STATUS + 8], rbp
        mov     rax, rbp
        xor     edx, edx
        mov     rcx, [rip + p_report]
        test    rcx, rcx
        jz      round_loop
        div     rcx
        test    rdx, rdx
        jnz     round_loop
        lea     rsi, [rip + s_round]
        call    puts
        mov     rax, rbp
        call    putdec
        lea     rsi, [rip + s_acc]
        call    puts
        mov     rax, r10
        call    puthex
        mov     al, 10
        call    putc
        jmp     round_loop

rounds_done:
        /* ---- final hash over all work memory ---- */
        mov     qword ptr [STATUS + 32], 4     /* phase: final hash */
        lea     r12, [rip + segs]
        mov     r13, [rip + nsegs]
fseg:
        mov     rsi, [r12]
        mov     rcx, [r12 + 8]
        shr     rcx, 3
fq:
        xor     r10, [rsi]
        imul    r10, r11
        add     rsi, 8
        dec     rcx
        jnz     fq
        add     r12, 16
        dec     r13
        jnz     fseg
        mov     [STATUS + 24], r10
        mov     qword ptr [STATUS + 32], 5     /* phase: done */
        lea     rsi, [rip + s_checksum]
        call    puts
        mov     rax, r10
        call    puthex
        mov     al, 10
        call    putc
        xor     eax, eax
        out     EXIT_PORT, al
        jmp     .

/* find_param: rsi = cmdline (NUL-terminated), rdi = key (NUL-terminated, e.g.
 * "stasis.mib="), rbx = where to store the decimal value.  Only matches at the
 * start of a word.  Clobbers rax, rcx, rdx, r8, r9. */
find_param:
        push    rsi
        mov     r8, rsi                 /* candidate start */
        mov     r9b, 32                 /* previous char: space */
fp_scan:
        mov     al, [r8]
        test    al, al
        jz      fp_out
        cmp     r9b, 32
        jne     fp_adv
        /* compare key at r8 */
        xor     ecx, ecx
fp_cmp:
        mov     dl, [rdi + rcx]
        test    dl, dl
        jz      fp_match
        cmp     dl, [r8 + rcx]
        jne     fp_adv
        inc     rcx
        jmp     fp_cmp
fp_match:
        add     rcx, r8
        xor     eax, eax
fp_digit:
        movzx   edx, byte ptr [rcx]
        sub     edx, '0'
        cmp     edx, 9
        ja      fp_store
        imul    rax, rax, 10
        add     rax, rdx
        inc     rcx
        jmp     fp_digit
fp_store:
        mov     [rbx], rax
fp_adv:
        mov     r9b, [r8]
        inc     r8
        jmp     fp_scan
fp_out:
        pop     rsi
        ret

/* puts: rsi = NUL-terminated string.  Clobbers rax, rdx, rsi. */
puts:
        mov     dx, COM1
1:      mov     al, [rsi]
        test    al, al
        jz      2f
        out     dx, al
        inc     rsi
        jmp     1b
2:      ret

/* putc: al.  Clobbers rdx. */
putc:
        mov     dx, COM1
        out     dx, al
        ret

/* puthex: rax as 16 hex digits.  Clobbers rax, rcx, rdx, rdi. */
puthex:
        mov     rdi, rax
        mov     ecx, 16
1:      rol     rdi, 4
        mov     eax, edi
        and     eax, 15
        cmp     eax, 10
        jb      2f
        add     eax, 'a' - 10 - '0'
2:      add     eax, '0'
        mov     dx, COM1
        out     dx, al
        dec     ecx
        jnz     1b
        ret

/* putdec: rax as decimal.  Clobbers rax, rcx, rdx, rdi. */
putdec:
        lea     rdi, [rip + numbuf + 31]
        mov     byte ptr [rdi], 0
        mov     ecx, 10
1:      xor     edx, edx
        div     rcx
        add     dl, '0'
        dec     rdi
        mov     [rdi], dl
        test    rax, rax
        jnz     1b
        push    rsi
        mov     rsi, rdi
        call    puts
        pop     rsi
        ret

        .balign 16
gdt:
        .quad   0                       /* 0x00 null */
        .quad   0x00af9b000000ffff      /* 0x08 kernel code, 64-bit */
        .quad   0x00cf93000000ffff      /* 0x10 kernel data */
        .quad   0x00cff3000000ffff      /* 0x18 user data (DPL 3) */
        .quad   0x00affb000000ffff      /* 0x20 user code, 64-bit (DPL 3) */
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .quad   gdt

k_mib:      .asciz "stasis.mib="
k_rounds:   .asciz "stasis.rounds="
k_seed:     .asciz "stasis.seed="
k_report:   .asciz "stasis.report="
k_base:     .asciz "stasis.base="
k_hot:      .asciz "stasis.hot="
s_hello:    .asciz "stasis-testguest: mib="
s_rounds:   .asciz " rounds="
s_seed:     .asciz " seed="
s_round:    .asciz "round "
s_acc:      .asciz " acc="
s_checksum: .asciz "checksum="
s_nomem:    .asciz "stasis-testguest: not enough memory for the requested mib\n"

        .balign 8
p_mib:      .quad 0
p_rounds:   .quad 0
p_seed:     .quad 0
p_report:   .quad 0
p_base:     .quad 0
p_hot:      .quad 0
nsegs:      .quad 0

        .bss
        .balign 4096
pml4:       .skip 4096
pdpt:       .skip 4096
pd:         .skip 4096 * MAX_GIB
segs:       .skip 16 * 32
numbuf:     .skip 32
        .balign 16
stack:      .skip 16384
stack_top:
