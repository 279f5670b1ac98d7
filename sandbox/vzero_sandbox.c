/*
 * vzero-sandbox: run ONE command confined, for model-written code (SVG rendering, matplotlib scripts).
 *
 *   vzero-sandbox [--timeout S] [--memory MIB] [options] [--] COMMAND [ARG ...]
 *
 * Process layout. The launcher (this program, unconfined) creates an empty host directory, then clone()s
 * an "init" child into new mount, pid, network, ipc and uts namespaces (plus a user namespace when the
 * launcher is not root). The init child (pid 1 of the new pid namespace, still privileged, our code only)
 *   - makes every mount private, mounts a size-capped tmpfs owned by the sandbox uid on the working
 *     directory, mounts a fresh /proc, then remounts the WHOLE tree read-only and nosuid with
 *     mount_setattr(AT_RECURSIVE) and clears read-only again on the working directory only;
 *   - forks the command process and reaps every process of the namespace; when the command exits it sends
 *     the wait status and rusage to the launcher and exits, and the kernel then kills whatever is left in
 *     the pid namespace (that is how "kill the whole tree" is done: no process can leave a pid namespace).
 * The command process sets the rlimits, drops privileges (root: a per-run uid 0x40000000 + launcher pid,
 * so RLIMIT_NPROC counts only this sandbox's tasks and is enforced; it keeps CAP_DAC_READ_SEARCH as an
 * ambient capability so it can read and run a Python that lives under a 0700 /root; non-root: the user
 * namespace maps only the caller's uid, and execve of a non-zero uid drops every capability), sets
 * no_new_privs, applies a Landlock ruleset where the kernel has one (writes only beneath the working
 * directory and to /dev/null; no TCP bind/connect; no signals or abstract unix sockets outside), installs
 * a seccomp allow-list, closes every other descriptor, and execs the command with a clean environment.
 *
 * Decisions.
 *   - Writes outside the working directory fail with EROFS (read-only mount), and again with EACCES (the
 *     uid owns nothing outside; Landlock). A mount namespace is required: if the kernel refuses it the
 *     launcher exits 125 with the reason. The network namespace is taken where permitted; the seccomp
 *     filter denies socket() (EPERM) in any case, and socketpair() only for AF_UNIX is allowed.
 *   - seccomp: an allow-list; everything else fails with EPERM (programs see an error and can report it;
 *     a kill would hide which call was refused). clone() with namespace flags fails with EPERM, clone3()
 *     with ENOSYS (its flags cannot be inspected; glibc then falls back to clone()). A syscall from another
 *     architecture (int 0x80 on x86_64, x32) kills the process: only an escape attempt does that.
 *   - Memory: the launcher sums the resident set size of every process in the sandbox every 10 ms and
 *     kills the tree above --memory (137, "memory limit (N MiB) exceeded": measured). RLIMIT_AS is set to
 *     --address-space (default 2 x --memory) as the hard stop for one huge allocation; under it C and Rust
 *     programs end in SIGABRT/SIGSEGV/SIGBUS (resvg aborts), which is reported as 137 "memory limit ...
 *     (inferred from SIGABRT)" -- inferred, not measured: a plain crash reads the same. Python raises
 *     MemoryError and exits with its own status (1).
 *   - Processes: RLIMIT_NPROC (--procs, threads included) makes fork() fail at the cap; it is enforced
 *     because the uid is neither root nor CAP_SYS_RESOURCE and is unique to this run. When the launcher
 *     sees the cap reached it kills the tree (137, "process limit") rather than let a fork bomb spin.
 *   - Output: stdout and stderr are buffered by the launcher (at most --output bytes together) and
 *     written out after the command ends, so a caller that does not read can never stall the timeout.
 *     Past the cap the tree is killed (137, "output limit"). stdin is inherited as is.
 *   - Exit status: the command's own; 128+N when it died of signal N; 124 wall-clock timeout; 137 a limit
 *     killed it (one stderr line names it); 125 the sandbox could not be set up (bad usage, a refused
 *     kernel feature); 126 the command cannot be executed; 127 it was not found. --report-fd FD writes one
 *     line "status=N limit=NAME seconds=S" to FD, which the command cannot forge (stderr it can).
 *
 * Test: ctest (see CMakeLists.txt: small C payloads), pytest tests/test_sandbox.py, and
 * `vzero-sandbox --probe` prints which confinement features this kernel offers (one JSON line).
 * Linux x86_64 only (the seccomp syscall list is per architecture).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/audit.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <math.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#if !defined(__x86_64__)
#error "vzero-sandbox: only x86_64 is supported (the seccomp allow-list is written per architecture)"
#endif

#define EXIT_TIMEOUT 124
#define EXIT_SETUP 125
#define EXIT_CANNOT_EXEC 126
#define EXIT_NOT_FOUND 127
#define EXIT_LIMIT 137
#define SANDBOX_UID_BASE 0x40000000u /* per-run uid = base + launcher pid: unused by real accounts */
#define SAMPLE_MS 10

#ifndef MOUNT_ATTR_RDONLY
#define MOUNT_ATTR_RDONLY 0x00000001
#define MOUNT_ATTR_NOSUID 0x00000002
struct mount_attr {
    uint64_t attr_set, attr_clr, propagation, userns_fd;
};
#endif
#ifndef AT_RECURSIVE
#define AT_RECURSIVE 0x8000
#endif
#ifndef __NR_map_shadow_stack
#define __NR_map_shadow_stack 453 /* x86_64, Linux 6.6; newer than the distribution headers */
#endif
#ifndef CLONE_NEWTIME
#define CLONE_NEWTIME 0x00000080
#endif
#define NS_FLAGS (CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET | \
                  CLONE_NEWCGROUP | CLONE_NEWTIME)

/* Landlock ABI (declared here: the distribution headers may predate ABI 4-6). */
#define LL_CREATE_RULESET_VERSION (1U << 0)
#define LL_RULE_PATH_BENEATH 1
#define LL_FS_WRITE_FILE (1ULL << 1)
#define LL_FS_REMOVE_DIR (1ULL << 4)
#define LL_FS_REMOVE_FILE (1ULL << 5)
#define LL_FS_MAKE_ALL (0x7FULL << 6) /* MAKE_CHAR .. MAKE_SYM */
#define LL_FS_REFER (1ULL << 13)      /* ABI 2 */
#define LL_FS_TRUNCATE (1ULL << 14)   /* ABI 3 */
#define LL_NET_BIND_TCP (1ULL << 0)   /* ABI 4 */
#define LL_NET_CONNECT_TCP (1ULL << 1)
#define LL_SCOPE_ABSTRACT_UNIX (1ULL << 0) /* ABI 6 */
#define LL_SCOPE_SIGNAL (1ULL << 1)
struct ll_ruleset_attr {
    uint64_t handled_access_fs, handled_access_net, scoped;
};
struct ll_path_beneath {
    uint64_t allowed_access;
    int32_t parent_fd;
} __attribute__((packed));

enum limit_kind { LIM_NONE, LIM_TIMEOUT, LIM_MEMORY, LIM_OUTPUT, LIM_PROCS, LIM_CPU, LIM_FSIZE, LIM_INTERRUPT };
static const char *const limit_names[] = {"none", "timeout", "memory", "output", "processes", "cpu", "file_size",
                                          "interrupted"};

struct options {
    double timeout;      /* wall-clock seconds */
    long memory_mib;     /* summed RSS of the sandbox's processes */
    long as_mib;         /* RLIMIT_AS per process */
    long cpu_s;          /* RLIMIT_CPU per process */
    long fsize_mib;      /* RLIMIT_FSIZE */
    long nofile;         /* RLIMIT_NOFILE */
    long nproc;          /* RLIMIT_NPROC (tasks, threads included) */
    long disk_mib;       /* size of the working directory's tmpfs */
    long output_limit;   /* bytes of stdout + stderr */
    int report_fd;       /* -1: none */
    const char *workroot;
    char **env;          /* the clean environment, NULL-terminated */
    int nenv;
    char **argv;         /* the command */
};

/* Messages on the control pipe (each one write(), below PIPE_BUF, so atomic). */
enum { MSG_SETUP_ERROR = 1, MSG_EXEC_ERROR, MSG_EXIT };
struct ctl_msg {
    int kind;
    int err;     /* errno */
    int wstatus; /* MSG_EXIT */
    int pad;
    struct rusage ru;
    char what[160];
};

static int ctl_fd = -1;

static void die_setup(const char *fmt, ...) {
    va_list ap;
    fprintf(stderr, "vzero-sandbox: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(EXIT_SETUP);
}

/* In a child: report the failed stage and errno to the launcher, then exit. */
static void child_fail(int kind, int code, const char *fmt, ...) {
    struct ctl_msg m;
    memset(&m, 0, sizeof m);
    m.kind = kind;
    m.err = errno;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(m.what, sizeof m.what, fmt, ap);
    va_end(ap);
    if (ctl_fd >= 0 && write(ctl_fd, &m, sizeof m) < 0) { /* the launcher is gone: nothing to tell */
    }
    _exit(code);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static long parse_long(const char *opt, const char *s, long lo, long hi) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) die_setup("%s: expected an integer in [%ld, %ld], got '%s'",
                                                              opt, lo, hi, s);
    return v;
}

static long parse_bytes(const char *opt, const char *s) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    double mult = 1;
    if (*end == 'k' || *end == 'K') mult = 1024, end++;
    else if (*end == 'm' || *end == 'M') mult = 1024.0 * 1024, end++;
    else if (*end == 'g' || *end == 'G') mult = 1024.0 * 1024 * 1024, end++;
    if (errno || end == s || *end || !(v >= 1) || v * mult > 1e12) die_setup("%s: expected a size like 65536, 64k or 16M, got '%s'", opt, s);
    return (long)(v * mult);
}

static void usage(FILE *f) {
    fputs("usage: vzero-sandbox [--timeout S] [--memory MIB] [--address-space MIB] [--cpu S] [--file-size MIB]\n"
          "                     [--files N] [--procs N] [--disk MIB] [--output BYTES] [--env KEY=VALUE]...\n"
          "                     [--workroot DIR] [--report-fd FD] [--] COMMAND [ARG ...]\n"
          "       vzero-sandbox --probe\n"
          "exit: the command's status; 128+N signal N; 124 timeout; 137 a limit (named on stderr);\n"
          "      125 setup failed; 126 cannot execute; 127 not found\n",
          f);
}

static void set_env(struct options *o, const char *kv) {
    const char *eq = strchr(kv, '=');
    if (!eq || eq == kv) die_setup("--env: expected KEY=VALUE, got '%s'", kv);
    size_t klen = (size_t)(eq - kv) + 1;
    for (int i = 0; i < o->nenv; i++)
        if (strncmp(o->env[i], kv, klen) == 0) {
            o->env[i] = strdup(kv);
            return;
        }
    o->env = realloc(o->env, sizeof(char *) * (size_t)(o->nenv + 2));
    if (!o->env) die_setup("out of memory");
    o->env[o->nenv++] = strdup(kv);
    o->env[o->nenv] = NULL;
}

/* ---------------------------------------------------------------------------------------------- seccomp */

static const int allowed_syscalls[] = {
    /* files and descriptors */
    __NR_read, __NR_write, __NR_readv, __NR_writev, __NR_pread64, __NR_pwrite64, __NR_preadv, __NR_pwritev,
    __NR_preadv2, __NR_pwritev2, __NR_open, __NR_openat, __NR_openat2, __NR_close, __NR_close_range,
    __NR_creat, __NR_stat, __NR_fstat, __NR_lstat, __NR_newfstatat, __NR_statx, __NR_statfs, __NR_fstatfs,
    __NR_lseek, __NR_access, __NR_faccessat, __NR_faccessat2, __NR_pipe, __NR_pipe2, __NR_dup, __NR_dup2,
    __NR_dup3, __NR_fcntl, __NR_flock, __NR_fsync, __NR_fdatasync, __NR_truncate, __NR_ftruncate,
    __NR_fallocate, __NR_fadvise64, __NR_readahead, __NR_getdents, __NR_getdents64, __NR_getcwd, __NR_chdir,
    __NR_fchdir, __NR_rename, __NR_renameat, __NR_renameat2, __NR_mkdir, __NR_mkdirat, __NR_rmdir, __NR_link,
    __NR_linkat, __NR_unlink, __NR_unlinkat, __NR_symlink, __NR_symlinkat, __NR_readlink, __NR_readlinkat,
    __NR_chmod, __NR_fchmod, __NR_fchmodat, __NR_umask, __NR_utime, __NR_utimes, __NR_utimensat,
    __NR_futimesat, __NR_sendfile, __NR_copy_file_range, __NR_splice, __NR_tee, __NR_getxattr,
    __NR_lgetxattr, __NR_fgetxattr, __NR_listxattr, __NR_llistxattr, __NR_flistxattr, __NR_memfd_create,
    /* polling, events, timers */
    __NR_poll, __NR_ppoll, __NR_select, __NR_pselect6, __NR_epoll_create, __NR_epoll_create1,
    __NR_epoll_ctl, __NR_epoll_wait, __NR_epoll_pwait, __NR_epoll_pwait2, __NR_eventfd, __NR_eventfd2,
    __NR_timerfd_create, __NR_timerfd_settime, __NR_timerfd_gettime, __NR_signalfd, __NR_signalfd4,
    __NR_inotify_init, __NR_inotify_init1, __NR_inotify_add_watch, __NR_inotify_rm_watch,
    __NR_nanosleep, __NR_clock_nanosleep, __NR_clock_gettime, __NR_clock_getres, __NR_gettimeofday,
    __NR_time, __NR_alarm, __NR_setitimer, __NR_getitimer, __NR_pause, __NR_timer_create,
    __NR_timer_settime, __NR_timer_gettime, __NR_timer_getoverrun, __NR_timer_delete,
    /* memory */
    __NR_mmap, __NR_mprotect, __NR_munmap, __NR_mremap, __NR_msync, __NR_mincore, __NR_madvise, __NR_brk,
    __NR_mlock, __NR_munlock, __NR_mlock2, __NR_membarrier, __NR_get_mempolicy, __NR_set_mempolicy,
    __NR_mbind, __NR_map_shadow_stack,
    /* signals */
    __NR_rt_sigaction, __NR_rt_sigprocmask, __NR_rt_sigreturn, __NR_rt_sigsuspend, __NR_rt_sigpending,
    __NR_rt_sigtimedwait, __NR_rt_sigqueueinfo, __NR_rt_tgsigqueueinfo, __NR_sigaltstack, __NR_kill,
    __NR_tkill, __NR_tgkill, __NR_restart_syscall,
    /* processes and threads (clone is checked separately) */
    __NR_fork, __NR_vfork, __NR_execve, __NR_execveat, __NR_exit, __NR_exit_group, __NR_wait4, __NR_waitid,
    __NR_getpid, __NR_getppid, __NR_gettid, __NR_getuid, __NR_geteuid, __NR_getgid, __NR_getegid,
    __NR_getresuid, __NR_getresgid, __NR_getgroups, __NR_getpgrp, __NR_getpgid, __NR_getsid, __NR_capget,
    __NR_futex, __NR_futex_waitv, __NR_set_robust_list, __NR_get_robust_list, __NR_set_tid_address,
    __NR_arch_prctl, __NR_prctl, __NR_rseq, __NR_sched_yield, __NR_sched_getaffinity,
    __NR_sched_setaffinity, __NR_sched_getparam, __NR_sched_getscheduler, __NR_sched_getattr,
    __NR_sched_get_priority_max, __NR_sched_get_priority_min, __NR_getpriority, __NR_setpriority,
    __NR_getrlimit, __NR_setrlimit, __NR_prlimit64, __NR_getrusage, __NR_times, __NR_sysinfo, __NR_uname,
    __NR_getrandom, __NR_getcpu, __NR_pidfd_open,
    /* local sockets made by socketpair() (socket() itself is denied) */
    __NR_sendmsg, __NR_recvmsg, __NR_sendto, __NR_recvfrom, __NR_sendmmsg, __NR_recvmmsg, __NR_shutdown,
    __NR_getsockopt, __NR_setsockopt, __NR_getsockname, __NR_getpeername,
};

#define BPF_STMT_(c, k) ((struct sock_filter)BPF_STMT((c), (k)))
#define BPF_JUMP_(c, k, t, f) ((struct sock_filter)BPF_JUMP((c), (k), (t), (f)))
#define RET_ERRNO(e) BPF_STMT_(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | ((e) & SECCOMP_RET_DATA))
#define RET_ALLOW BPF_STMT_(BPF_RET | BPF_K, SECCOMP_RET_ALLOW)
#define LOAD_NR BPF_STMT_(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr))
#define LOAD_ARG_LO(i) BPF_STMT_(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, args[i]))

/* Builds the filter into f (capacity n); returns its length. */
static size_t build_filter(struct sock_filter *f, size_t n) {
    size_t k = 0;
#define EMIT(x) do { if (k < n) f[k] = (x); k++; } while (0)
    EMIT(BPF_STMT_(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)));
    EMIT(BPF_JUMP_(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0));
    EMIT(BPF_STMT_(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
    EMIT(LOAD_NR);
    EMIT(BPF_JUMP_(BPF_JMP | BPF_JGE | BPF_K, 0x40000000 /* x32 */, 0, 1));
    EMIT(BPF_STMT_(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
    /* socket(): no new sockets, whatever the family */
    EMIT(BPF_JUMP_(BPF_JMP | BPF_JEQ | BPF_K, __NR_socket, 0, 1));
    EMIT(RET_ERRNO(EPERM));
    /* socketpair(): AF_UNIX only */
    EMIT(BPF_JUMP_(BPF_JMP | BPF_JEQ | BPF_K, __NR_socketpair, 0, 4));
    EMIT(LOAD_ARG_LO(0));
    EMIT(BPF_JUMP_(BPF_JMP | BPF_JEQ | BPF_K, AF_UNIX, 0, 1));
    EMIT(RET_ALLOW);
    EMIT(RET_ERRNO(EPERM));
    /* clone(): no namespace flags */
    EMIT(BPF_JUMP_(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone, 0, 4));
    EMIT(LOAD_ARG_LO(0));
    EMIT(BPF_JUMP_(BPF_JMP | BPF_JSET | BPF_K, NS_FLAGS, 0, 1));
    EMIT(RET_ERRNO(EPERM));
    EMIT(RET_ALLOW);
    /* clone3(): flags live in memory the filter cannot read; ENOSYS makes glibc fall back to clone() */
    EMIT(BPF_JUMP_(BPF_JMP | BPF_JEQ | BPF_K, __NR_clone3, 0, 1));
    EMIT(RET_ERRNO(ENOSYS));
    /* ioctl(): not TIOCSTI / TIOCLINUX (typing into the caller's terminal) */
    EMIT(BPF_JUMP_(BPF_JMP | BPF_JEQ | BPF_K, __NR_ioctl, 0, 5));
    EMIT(LOAD_ARG_LO(1));
    EMIT(BPF_JUMP_(BPF_JMP | BPF_JEQ | BPF_K, TIOCSTI, 2, 0));
    EMIT(BPF_JUMP_(BPF_JMP | BPF_JEQ | BPF_K, TIOCLINUX, 1, 0));
    EMIT(RET_ALLOW);
    EMIT(RET_ERRNO(EPERM));
    for (size_t i = 0; i < sizeof allowed_syscalls / sizeof allowed_syscalls[0]; i++) {
        EMIT(BPF_JUMP_(BPF_JMP | BPF_JEQ | BPF_K, (unsigned)allowed_syscalls[i], 0, 1));
        EMIT(RET_ALLOW);
    }
    EMIT(RET_ERRNO(EPERM));
#undef EMIT
    return k;
}

static int install_seccomp(void) {
    struct sock_filter f[1024];
    size_t len = build_filter(f, sizeof f / sizeof f[0]);
    if (len > sizeof f / sizeof f[0]) {
        errno = E2BIG;
        return -1;
    }
    struct sock_fprog prog = {.len = (unsigned short)len, .filter = f};
    return (int)syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &prog);
}

/* ---------------------------------------------------------------------------------------------- landlock */

static int landlock_abi(void) {
    long v = syscall(SYS_landlock_create_ruleset, NULL, 0, LL_CREATE_RULESET_VERSION);
    return v < 0 ? 0 : (int)v;
}

static int ll_allow(int ruleset, const char *path, uint64_t access) {
    int fd = open(path, O_PATH | O_CLOEXEC);
    if (fd < 0) return -1;
    struct ll_path_beneath rule = {.allowed_access = access, .parent_fd = fd};
    int rc = (int)syscall(SYS_landlock_add_rule, ruleset, LL_RULE_PATH_BENEATH, &rule, 0);
    close(fd);
    return rc;
}

/* Writes only beneath workdir (and to /dev/null); with ABI >= 4 no TCP; with ABI >= 6 no signals or
 * abstract unix sockets to processes outside the sandbox. Returns 0, or -1 with errno. */
static int apply_landlock(int abi, const char *workdir) {
    struct ll_ruleset_attr attr = {0};
    uint64_t fs = LL_FS_WRITE_FILE | LL_FS_REMOVE_DIR | LL_FS_REMOVE_FILE | LL_FS_MAKE_ALL;
    if (abi >= 2) fs |= LL_FS_REFER;
    if (abi >= 3) fs |= LL_FS_TRUNCATE;
    attr.handled_access_fs = fs;
    size_t size = sizeof(uint64_t);
    if (abi >= 4) attr.handled_access_net = LL_NET_BIND_TCP | LL_NET_CONNECT_TCP, size = 2 * sizeof(uint64_t);
    if (abi >= 6) attr.scoped = LL_SCOPE_ABSTRACT_UNIX | LL_SCOPE_SIGNAL, size = sizeof attr;
    int rs = (int)syscall(SYS_landlock_create_ruleset, &attr, size, 0);
    if (rs < 0) return -1;
    uint64_t file_rights = LL_FS_WRITE_FILE | (abi >= 3 ? LL_FS_TRUNCATE : 0);
    if (ll_allow(rs, workdir, fs) < 0 || ll_allow(rs, "/dev/null", file_rights) < 0 ||
        syscall(SYS_landlock_restrict_self, rs, 0) < 0) {
        int e = errno;
        close(rs);
        errno = e;
        return -1;
    }
    close(rs);
    return 0;
}

/* ---------------------------------------------------------------------------------------------- children */

struct child_ctx {
    const struct options *o;
    const char *workdir;
    int root_mode;      /* launcher is root: drop to a per-run uid */
    uid_t uid;          /* the sandbox uid (root mode: per-run; user mode: the caller's) */
    gid_t gid;
    uid_t outer_uid;    /* user mode: for the uid_map */
    gid_t outer_gid;
    int out_w, err_w;   /* write ends of the capture pipes */
    int ll_abi;
};

static void write_file(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0 || write(fd, text, strlen(text)) != (ssize_t)strlen(text))
        child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "writing %s", path);
    close(fd);
}

static int mount_setattr_(const char *path, unsigned flags, uint64_t set, uint64_t clr) {
    struct mount_attr a;
    memset(&a, 0, sizeof a);
    a.attr_set = set;
    a.attr_clr = clr;
    return (int)syscall(SYS_mount_setattr, AT_FDCWD, path, flags, &a, sizeof a);
}

static void drop_privileges(const struct child_ctx *c) {
    if (!c->root_mode) return; /* user namespace: execve of a non-zero uid drops every capability */
    for (int cap = 0; cap <= 63; cap++)
        if (cap != CAP_DAC_READ_SEARCH && prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL)
            child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "dropping the capability bounding set");
    if (prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0 || setgroups(0, NULL) < 0 ||
        setresgid(c->gid, c->gid, c->gid) < 0 || setresuid(c->uid, c->uid, c->uid) < 0)
        child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "switching to uid %u", (unsigned)c->uid);
    struct __user_cap_header_struct h = {.version = _LINUX_CAPABILITY_VERSION_3, .pid = 0};
    struct __user_cap_data_struct d[2];
    memset(d, 0, sizeof d);
    d[0].effective = d[0].permitted = d[0].inheritable = 1u << CAP_DAC_READ_SEARCH;
    if (syscall(SYS_capset, &h, d) < 0 ||
        prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, CAP_DAC_READ_SEARCH, 0, 0) < 0)
        child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "keeping CAP_DAC_READ_SEARCH");
}

static void set_rlimit(int res, rlim_t soft, rlim_t hard, const char *name) {
    struct rlimit r = {.rlim_cur = soft, .rlim_max = hard};
    if (setrlimit(res, &r) < 0) child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "setrlimit(%s)", name);
}

static const char *env_get(char **env, const char *key) {
    size_t n = strlen(key);
    for (; *env; env++)
        if (strncmp(*env, key, n) == 0 && (*env)[n] == '=') return *env + n + 1;
    return NULL;
}

/* execvpe() with the sandbox's own PATH; returns only on failure (errno: the most telling one). */
static void exec_command(char **argv, char **env) {
    const char *cmd = argv[0];
    if (strchr(cmd, '/')) {
        execve(cmd, argv, env);
        return;
    }
    const char *path = env_get(env, "PATH");
    int seen_eacces = 0;
    char buf[PATH_MAX];
    for (const char *p = path ? path : ""; *p;) {
        const char *colon = strchr(p, ':');
        size_t len = colon ? (size_t)(colon - p) : strlen(p);
        if (len && len + strlen(cmd) + 2 < sizeof buf) {
            snprintf(buf, sizeof buf, "%.*s/%s", (int)len, p, cmd);
            execve(buf, argv, env);
            if (errno == EACCES) seen_eacces = 1;
        }
        p += len + (colon ? 1 : 0);
    }
    errno = seen_eacces ? EACCES : ENOENT;
}

/* The command process: limits, privileges, Landlock, seccomp, exec. */
static void command_main(const struct child_ctx *c) {
    const struct options *o = c->o;
    if (dup2(c->out_w, 1) < 0 || dup2(c->err_w, 2) < 0)
        child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "redirecting stdout/stderr");
    /* keep 0, 1, 2 and the control pipe (close-on-exec); nothing else of the launcher leaks in */
    int keep = fcntl(ctl_fd, F_DUPFD_CLOEXEC, 3);
    if (keep < 0) child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "moving the control pipe");
    if (keep != 3) {
        if (dup3(keep, 3, O_CLOEXEC) < 0) child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "moving the control pipe");
        keep = 3;
    }
    ctl_fd = 3;
    if (syscall(SYS_close_range, 4, ~0U, 0) < 0) child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "close_range");
    if (chdir(c->workdir) < 0) child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "chdir %s", c->workdir);
    const rlim_t MiB = 1024 * 1024;
    set_rlimit(RLIMIT_AS, (rlim_t)o->as_mib * MiB, (rlim_t)o->as_mib * MiB, "AS");
    set_rlimit(RLIMIT_CPU, (rlim_t)o->cpu_s, (rlim_t)o->cpu_s + 1, "CPU");
    set_rlimit(RLIMIT_FSIZE, (rlim_t)o->fsize_mib * MiB, (rlim_t)o->fsize_mib * MiB, "FSIZE");
    set_rlimit(RLIMIT_NOFILE, (rlim_t)o->nofile, (rlim_t)o->nofile, "NOFILE");
    set_rlimit(RLIMIT_NPROC, (rlim_t)o->nproc, (rlim_t)o->nproc, "NPROC");
    set_rlimit(RLIMIT_CORE, 0, 0, "CORE");
    set_rlimit(RLIMIT_MSGQUEUE, 0, 0, "MSGQUEUE");
    drop_privileges(c);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "no_new_privs");
    if (c->ll_abi > 0 && apply_landlock(c->ll_abi, c->workdir) < 0)
        child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "Landlock (ABI %d) refused", c->ll_abi);
    /* signals back to their defaults: the launcher ignores SIGPIPE, and so would the command */
    signal(SIGPIPE, SIG_DFL);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (install_seccomp() < 0) child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "installing the seccomp filter");
    exec_command(o->argv, o->env);
    child_fail(MSG_EXEC_ERROR, errno == ENOENT || errno == ENOTDIR ? EXIT_NOT_FOUND : EXIT_CANNOT_EXEC,
               "%s", o->argv[0]);
}

/* pid 1 of the new pid namespace: set up the file system view, run the command, reap, report. */
static void init_main(const struct child_ctx *c) {
    prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0); /* the launcher dies -> this dies -> the namespace dies */
    if (!c->root_mode) {
        char map[64];
        write_file("/proc/self/setgroups", "deny");
        snprintf(map, sizeof map, "%u %u 1", (unsigned)c->uid, (unsigned)c->outer_uid);
        write_file("/proc/self/uid_map", map);
        snprintf(map, sizeof map, "%u %u 1", (unsigned)c->gid, (unsigned)c->outer_gid);
        write_file("/proc/self/gid_map", map);
    }
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0)
        child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "making mounts private (mount namespace refused?)");
    char opts[128];
    snprintf(opts, sizeof opts, "size=%ldm,mode=0700,uid=%u,gid=%u", c->o->disk_mib, (unsigned)c->uid,
             (unsigned)c->gid);
    if (mount("tmpfs", c->workdir, "tmpfs", MS_NOSUID | MS_NODEV, opts) < 0)
        child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "mounting a tmpfs on %s", c->workdir);
    if (mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
        child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "mounting /proc for the new pid namespace");
    if (mount_setattr_("/", AT_RECURSIVE, MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0) < 0)
        child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "remounting / read-only (mount_setattr, Linux >= 5.12)");
    if (mount_setattr_(c->workdir, 0, 0, MOUNT_ATTR_RDONLY) < 0)
        child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "making %s writable", c->workdir);
    pid_t cmd = fork();
    if (cmd < 0) child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "fork");
    if (cmd == 0) command_main(c);
    close(c->out_w);
    close(c->err_w);
    struct ctl_msg m;
    memset(&m, 0, sizeof m);
    m.kind = MSG_EXIT;
    for (;;) {
        int st;
        struct rusage ru;
        pid_t p = wait4(-1, &st, 0, &ru);
        if (p == cmd) {
            m.wstatus = st;
            m.ru = ru;
            break;
        }
        if (p < 0 && errno != EINTR) child_fail(MSG_SETUP_ERROR, EXIT_SETUP, "wait4");
    }
    if (write(ctl_fd, &m, sizeof m) < 0) _exit(EXIT_SETUP);
    _exit(0); /* the kernel now kills every process left in this pid namespace */
}

/* ---------------------------------------------------------------------------------------------- launcher */

static volatile sig_atomic_t got_signal;
static void on_signal(int sig) { got_signal = sig; }

struct buf {
    char *data;
    size_t len, cap;
};

static void buf_add(struct buf *b, const char *p, size_t n) {
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 65536;
        while (cap < b->len + n) cap *= 2;
        b->data = realloc(b->data, cap);
        if (!b->data) die_setup("out of memory buffering output");
        b->cap = cap;
    }
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

static void write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return; /* the reader went away: nothing else to do with the output */
        p += w;
        n -= (size_t)w;
    }
}

/* RSS pages, tasks (threads) and processes summed over every descendant of a pid (itself excluded),
 * found through /proc/PID/task/TID/children (CONFIG_PROC_CHILDREN). Shared pages count once per process:
 * the sum over-estimates, never under-estimates. */
struct usage {
    long rss_pages, tasks, procs;
};

#define MAX_WALK 8192

static void walk_tree(pid_t root, struct usage *u) {
    static pid_t queue[MAX_WALK];
    size_t head = 0, tail = 0;
    queue[tail++] = root;
    while (head < tail) {
        pid_t pid = queue[head++];
        if (pid != root) {
            char spath[64], stat[1024];
            snprintf(spath, sizeof spath, "/proc/%d/stat", pid);
            int sfd = open(spath, O_RDONLY | O_CLOEXEC);
            if (sfd < 0) continue;
            ssize_t m = read(sfd, stat, sizeof stat - 1);
            close(sfd);
            if (m <= 0) continue;
            stat[m] = 0;
            char *rp = strrchr(stat, ')');
            if (!rp || !rp[1]) continue;
            /* the fields after "pid (comm)" start at field 3 (state); num_threads is 20, rss 24 */
            long field[25] = {0};
            int k = 3;
            char *save = NULL;
            for (char *f = strtok_r(rp + 2, " ", &save); f && k <= 24; f = strtok_r(NULL, " ", &save), k++)
                field[k] = atol(f);
            u->tasks += field[20] > 0 ? field[20] : 1;
            u->rss_pages += field[24];
            u->procs++;
        }
        char path[64];
        snprintf(path, sizeof path, "/proc/%d/task", pid);
        DIR *d = opendir(path);
        if (!d) continue;
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.') continue;
            char cpath[320], list[8192];
            snprintf(cpath, sizeof cpath, "/proc/%d/task/%s/children", pid, e->d_name);
            int fd = open(cpath, O_RDONLY | O_CLOEXEC);
            if (fd < 0) continue;
            ssize_t n = read(fd, list, sizeof list - 1);
            close(fd);
            if (n <= 0) continue;
            list[n] = 0;
            char *save = NULL;
            for (char *tok = strtok_r(list, " \n", &save); tok && tail < MAX_WALK; tok = strtok_r(NULL, " \n", &save))
                queue[tail++] = (pid_t)atoi(tok);
        }
        closedir(d);
    }
}

static const char *signame(int sig) {
    const char *s = sigabbrev_np(sig);
    return s ? s : "?";
}

static int probe(void);

int main(int argc, char **argv) {
    struct options o = {.timeout = 30, .memory_mib = 1024, .as_mib = 0, .cpu_s = 0, .fsize_mib = 64,
                        .nofile = 256, .nproc = 64, .disk_mib = 64, .output_limit = 16L << 20,
                        .report_fd = -1, .workroot = NULL};
    const char *tmp = getenv("TMPDIR");
    o.workroot = tmp && tmp[0] == '/' ? tmp : "/tmp";
    o.env = calloc(1, sizeof(char *));
    int i = 1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) {
            i++;
            break;
        }
        if (a[0] != '-') break;
        if (strcmp(a, "--probe") == 0) return probe();
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        }
        if (i + 1 >= argc) {
            usage(stderr);
            die_setup("%s needs a value", a);
        }
        const char *v = argv[++i];
        if (strcmp(a, "--timeout") == 0) {
            char *end;
            o.timeout = strtod(v, &end);
            if (end == v || *end || !(o.timeout > 0) || o.timeout > 1e6)
                die_setup("--timeout: expected seconds > 0, got '%s'", v);
        } else if (strcmp(a, "--memory") == 0) o.memory_mib = parse_long(a, v, 1, 1L << 30);
        else if (strcmp(a, "--address-space") == 0) o.as_mib = parse_long(a, v, 1, 1L << 30);
        else if (strcmp(a, "--cpu") == 0) o.cpu_s = parse_long(a, v, 1, 1L << 30);
        else if (strcmp(a, "--file-size") == 0) o.fsize_mib = parse_long(a, v, 0, 1L << 30);
        else if (strcmp(a, "--files") == 0) o.nofile = parse_long(a, v, 4, 1L << 20);
        else if (strcmp(a, "--procs") == 0) o.nproc = parse_long(a, v, 1, 1L << 20);
        else if (strcmp(a, "--disk") == 0) o.disk_mib = parse_long(a, v, 1, 1L << 30);
        else if (strcmp(a, "--output") == 0) o.output_limit = parse_bytes(a, v);
        else if (strcmp(a, "--env") == 0) set_env(&o, v);
        else if (strcmp(a, "--workroot") == 0) o.workroot = v;
        else if (strcmp(a, "--report-fd") == 0) {
            o.report_fd = (int)parse_long(a, v, 0, INT_MAX);
            if (fcntl(o.report_fd, F_GETFD) < 0) die_setup("--report-fd %d: not an open descriptor", o.report_fd);
        } else {
            usage(stderr);
            die_setup("unknown option '%s'", a);
        }
    }
    if (i >= argc) {
        usage(stderr);
        die_setup("no command given");
    }
    o.argv = argv + i;
    if (!o.as_mib) o.as_mib = 2 * o.memory_mib;
    if (!o.cpu_s) o.cpu_s = (long)ceil(o.timeout) + 1;

    struct child_ctx c = {.o = &o, .root_mode = geteuid() == 0, .ll_abi = landlock_abi()};
    if (c.root_mode) {
        c.uid = SANDBOX_UID_BASE + (uid_t)getpid();
        c.gid = c.uid;
    } else {
        c.uid = c.outer_uid = geteuid();
        c.gid = c.outer_gid = getegid();
    }

    /* the working directory: an empty host directory, a fresh tmpfs over it inside the sandbox */
    char workdir[PATH_MAX];
    if (snprintf(workdir, sizeof workdir, "%s/vzero-sandbox.XXXXXX", o.workroot) >= (int)sizeof workdir)
        die_setup("--workroot too long");
    if (!mkdtemp(workdir)) die_setup("cannot create a working directory under %s: %s", o.workroot, strerror(errno));
    c.workdir = workdir;
    /* the clean environment: defaults first, --env overrides them */
    struct options base = {0};
    base.env = calloc(1, sizeof(char *));
    char kv[PATH_MAX + 16];
    set_env(&base, "PATH=/usr/local/bin:/usr/bin:/bin");
    snprintf(kv, sizeof kv, "HOME=%s", workdir);
    set_env(&base, kv);
    snprintf(kv, sizeof kv, "TMPDIR=%s", workdir);
    set_env(&base, kv);
    set_env(&base, "LANG=C.UTF-8");
    for (int k = 0; k < o.nenv; k++) set_env(&base, o.env[k]);
    o.env = base.env;
    o.nenv = base.nenv;

    int outp[2], errp[2], ctlp[2];
    if (pipe2(outp, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0 || pipe2(ctlp, O_CLOEXEC) < 0) {
        rmdir(workdir);
        die_setup("pipe: %s", strerror(errno));
    }
    c.out_w = outp[1];
    c.err_w = errp[1];

    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);

    double t0 = now_s();
    unsigned long flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWNET | CLONE_NEWIPC | CLONE_NEWUTS | SIGCHLD;
    if (!c.root_mode) flags |= CLONE_NEWUSER;
    fflush(NULL);
    pid_t init = (pid_t)syscall(SYS_clone, flags, NULL, NULL, NULL, NULL);
    int netns = 1;
    if (init < 0 && (errno == EPERM || errno == EINVAL || errno == ENOSPC || errno == EUSERS)) {
        netns = 0; /* a network namespace where permitted; seccomp denies socket() in any case */
        init = (pid_t)syscall(SYS_clone, flags & ~(unsigned long)CLONE_NEWNET, NULL, NULL, NULL, NULL);
    }
    if (init < 0) {
        int e = errno;
        rmdir(workdir);
        die_setup("the kernel refused new %s namespaces (clone: %s); run as root or allow unprivileged "
                  "user namespaces (sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone)",
                  c.root_mode ? "mount/pid" : "user/mount/pid", strerror(e));
    }
    if (init == 0) {
        close(outp[0]);
        close(errp[0]);
        close(ctlp[0]);
        ctl_fd = ctlp[1];
        init_main(&c);
    }
    close(outp[1]);
    close(errp[1]);
    close(ctlp[1]);

    struct buf out = {0}, err = {0};
    struct ctl_msg setup_err = {0}, exit_msg = {0};
    int have_setup_err = 0, have_exit = 0;
    enum limit_kind killed_for = LIM_NONE;
    struct usage peak = {0};
    long page = sysconf(_SC_PAGESIZE);
    double deadline = t0 + o.timeout, next_sample = t0;
    struct pollfd pf[3] = {{.fd = outp[0], .events = POLLIN}, {.fd = errp[0], .events = POLLIN},
                           {.fd = ctlp[0], .events = POLLIN}};
    int open_fds = 3;
    size_t ctl_got = 0;
    struct ctl_msg ctl_in;
    int killed = 0;
    double killed_at = 0;
#define KILL_FOR(why) do { if (!killed) { killed = 1; killed_at = now_s(); killed_for = (why); kill(init, SIGKILL); } } while (0)
    while (open_fds > 0) {
        double t = now_s();
        if (killed && t > killed_at + 10) break; /* the namespace is gone by now: never hang on a pipe */
        if (got_signal) KILL_FOR(LIM_INTERRUPT);
        if (t >= deadline) KILL_FOR(LIM_TIMEOUT);
        if (!killed && t >= next_sample) {
            struct usage u = {0};
            walk_tree(init, &u);
            if (u.rss_pages > peak.rss_pages) peak.rss_pages = u.rss_pages;
            if (u.tasks > peak.tasks) peak.tasks = u.tasks;
            if ((double)u.rss_pages * (double)page > (double)o.memory_mib * 1048576.0) KILL_FOR(LIM_MEMORY);
            /* user-namespace mode: init runs as the same uid, so it counts against RLIMIT_NPROC too */
            else if (u.tasks + (c.root_mode ? 0 : 1) >= o.nproc) KILL_FOR(LIM_PROCS);
            next_sample = t + SAMPLE_MS * 1e-3;
        }
        int wait_ms = killed ? 1000 : (int)fmin(SAMPLE_MS, fmax(0, (deadline - t) * 1000) + 1);
        int r = poll(pf, 3, wait_ms);
        if (r < 0 && errno != EINTR) break;
        for (int k = 0; k < 3 && r > 0; k++) {
            if (pf[k].fd < 0 || !(pf[k].revents & (POLLIN | POLLHUP | POLLERR))) continue;
            char chunk[65536];
            ssize_t n = read(pf[k].fd, k == 2 ? (char *)&ctl_in + ctl_got : chunk,
                             k == 2 ? sizeof ctl_in - ctl_got : sizeof chunk);
            if (n < 0 && errno == EINTR) continue;
            if (n <= 0) {
                close(pf[k].fd);
                pf[k].fd = -1;
                open_fds--;
                continue;
            }
            if (k == 2) {
                ctl_got += (size_t)n;
                if (ctl_got == sizeof ctl_in) {
                    ctl_got = 0;
                    if (ctl_in.kind == MSG_EXIT) exit_msg = ctl_in, have_exit = 1;
                    else if (!have_setup_err) setup_err = ctl_in, have_setup_err = 1;
                }
                continue;
            }
            if (out.len + err.len + (size_t)n > (size_t)o.output_limit) {
                size_t room = (size_t)o.output_limit - out.len - err.len;
                buf_add(k == 0 ? &out : &err, chunk, room);
                KILL_FOR(LIM_OUTPUT);
                continue;
            }
            if (!(killed && killed_for == LIM_OUTPUT)) buf_add(k == 0 ? &out : &err, chunk, (size_t)n);
        }
    }
    int st = 0;
    while (waitpid(init, &st, 0) < 0 && errno == EINTR) {
    }
    double seconds = now_s() - t0;
    rmdir(workdir);

    write_all(1, out.data, out.len);
    write_all(2, err.data, err.len);
    int status;
    enum limit_kind limit = LIM_NONE;
    char line[320] = "";
    const char *inferred = NULL;
    if (killed_for == LIM_INTERRUPT) {
        status = 128 + got_signal;
        limit = LIM_INTERRUPT;
        snprintf(line, sizeof line, "vzero-sandbox: interrupted by %s; the command was killed", signame(got_signal));
    } else if (have_setup_err) {
        status = setup_err.kind == MSG_EXEC_ERROR
                     ? (setup_err.err == ENOENT || setup_err.err == ENOTDIR ? EXIT_NOT_FOUND : EXIT_CANNOT_EXEC)
                     : EXIT_SETUP;
        snprintf(line, sizeof line, "vzero-sandbox: %s%s: %s", setup_err.kind == MSG_EXEC_ERROR ? "cannot run " : "",
                 setup_err.what, strerror(setup_err.err));
    } else if (killed_for == LIM_TIMEOUT) {
        status = EXIT_TIMEOUT;
        limit = LIM_TIMEOUT;
        snprintf(line, sizeof line, "vzero-sandbox: wall-clock limit (%g s) exceeded", o.timeout);
    } else if (killed_for != LIM_NONE) {
        status = EXIT_LIMIT;
        limit = killed_for;
    } else if (!have_exit) {
        status = EXIT_SETUP;
        snprintf(line, sizeof line, "vzero-sandbox: the sandbox's init process died without a report (status %d)", st);
    } else if (WIFEXITED(exit_msg.wstatus)) {
        status = WEXITSTATUS(exit_msg.wstatus);
    } else {
        int sig = WTERMSIG(exit_msg.wstatus);
        double cpu = exit_msg.ru.ru_utime.tv_sec + exit_msg.ru.ru_stime.tv_sec +
                     (exit_msg.ru.ru_utime.tv_usec + exit_msg.ru.ru_stime.tv_usec) * 1e-6;
        status = EXIT_LIMIT;
        if (sig == SIGXCPU || (sig == SIGKILL && cpu >= (double)o.cpu_s)) limit = LIM_CPU;
        else if (sig == SIGXFSZ) limit = LIM_FSIZE;
        else if (sig == SIGABRT || sig == SIGSEGV || sig == SIGBUS || sig == SIGKILL) {
            limit = LIM_MEMORY;
            inferred = signame(sig);
        } else {
            status = 128 + sig;
            snprintf(line, sizeof line, "vzero-sandbox: the command was killed by SIG%s", signame(sig));
        }
    }
    switch (limit) {
    case LIM_MEMORY:
        if (inferred)
            snprintf(line, sizeof line,
                     "vzero-sandbox: memory limit (%ld MiB) exceeded (inferred from SIG%s under the %ld MiB "
                     "address-space limit)",
                     o.memory_mib, inferred, o.as_mib);
        else
            snprintf(line, sizeof line, "vzero-sandbox: memory limit (%ld MiB) exceeded", o.memory_mib);
        break;
    case LIM_OUTPUT:
        snprintf(line, sizeof line, "vzero-sandbox: output limit (%ld bytes) exceeded", o.output_limit);
        break;
    case LIM_PROCS:
        snprintf(line, sizeof line, "vzero-sandbox: process limit (%ld tasks) reached", o.nproc);
        break;
    case LIM_CPU:
        snprintf(line, sizeof line, "vzero-sandbox: cpu limit (%ld s) exceeded", o.cpu_s);
        break;
    case LIM_FSIZE:
        snprintf(line, sizeof line, "vzero-sandbox: file size limit (%ld MiB) exceeded", o.fsize_mib);
        break;
    default:
        break;
    }
    if (line[0]) {
        write_all(2, line, strlen(line));
        write_all(2, "\n", 1);
    }
    if (o.report_fd >= 0) {
        char rep[160];
        int n = snprintf(rep, sizeof rep, "status=%d limit=%s seconds=%.6f netns=%d peak_rss_mib=%.1f peak_tasks=%ld\n",
                         status, limit_names[limit], seconds, netns, peak.rss_pages * (double)page / 1048576.0,
                         peak.tasks);
        write_all(o.report_fd, rep, (size_t)n);
    }
    return status;
}

/* ---------------------------------------------------------------------------------------------- probe */

/* Runs fn in a child with the given clone flags; 1 if both the clone and fn succeeded. */
static int try_in_child(unsigned long flags, int (*fn)(void)) {
    pid_t p = (pid_t)syscall(SYS_clone, flags | SIGCHLD, NULL, NULL, NULL, NULL);
    if (p < 0) return 0;
    if (p == 0) _exit(fn ? (fn() == 0 ? 0 : 1) : 0);
    int st;
    if (waitpid(p, &st, 0) < 0) return 0;
    return WIFEXITED(st) && WEXITSTATUS(st) == 0;
}

static int probe_ro_remount(void) {
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) < 0) return -1;
    return mount_setattr_("/", AT_RECURSIVE, MOUNT_ATTR_RDONLY, 0);
}

static int probe_seccomp(void) {
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0 || install_seccomp() < 0) return -1;
    errno = 0;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    return fd < 0 && errno == EPERM ? 0 : -1;
}

static int probe(void) {
    int root = geteuid() == 0;
    unsigned long user = root ? 0 : CLONE_NEWUSER;
    int userns = try_in_child(CLONE_NEWUSER, NULL);
    int mountns = try_in_child(user | CLONE_NEWNS, NULL);
    int pidns = try_in_child(user | CLONE_NEWPID, NULL);
    int netns = try_in_child(user | CLONE_NEWNET, NULL);
    int ro = try_in_child(user | CLONE_NEWNS, probe_ro_remount);
    int sec = try_in_child(0, probe_seccomp);
    int ll = landlock_abi();
    int ready = mountns && pidns && ro && sec && (root || userns);
    printf("{\"root\": %s, \"mode\": \"%s\", \"user_ns\": %s, \"mount_ns\": %s, \"pid_ns\": %s, \"net_ns\": %s, "
           "\"readonly_remount\": %s, \"seccomp\": %s, \"landlock_abi\": %d, \"ready\": %s}\n",
           root ? "true" : "false", root ? "uid-drop" : "user-namespace", userns ? "true" : "false",
           mountns ? "true" : "false", pidns ? "true" : "false", netns ? "true" : "false", ro ? "true" : "false",
           sec ? "true" : "false", ll, ready ? "true" : "false");
    return ready ? 0 : EXIT_SETUP;
}
