/* cm-task: what a task's process does between its start and the job's command,
 * as root then as its user; the same steps as taskchild.py's TaskChild, in C.
 *
 * Why C: a compute daemon starts it with posix_spawn (a vfork: no copy of the
 * daemon's memory), and it is small, so a task costs about a millisecond of
 * CPU instead of the three that a fork of a Python process and the Python
 * code after it cost. For an array of a thousand short tasks that is most of
 * what a task costs. Without this binary (no C compiler where cm was built)
 * the node forks TaskChild instead: the same steps, slower.
 *
 * Its input is never its arguments or its environment (both empty: it runs
 * as root, and the job's environment is the user's, LD_PRELOAD or
 * GLIBC_TUNABLES included; /proc/PID/cmdline is readable by everyone). The
 * daemon passes, as the file on descriptor 3 (a memfd), strings each ended by
 * a NUL (a list: its length, then its items): the format's version, the daemon's pid, uid, gid, the
 * number of groups and each group, the number of cgroup.procs files and each,
 * the working directory, the log directory, the rank, the attempt, the
 * script, the number of arguments and each, the number of environment
 * entries and each. Descriptor 4 is the report pipe: closed by the exec (the
 * task runs), or given "CODE<TAB>MESSAGE" and the process ends with CODE (an
 * error number in MESSAGE as \x01N\x01, which the daemon words).
 *
 * The steps: default signals, a session of its own, umask 022, stdin from
 * /dev/null; join the job's cgroups (as root, before anything of the job's
 * can fork); become the user (groups, gid, uid: saved ids too, so there is
 * no way back); die with the daemon; enter the working directory, make
 * cmlogs/<dir> and open its logs (never through a link, only a plain file of
 * the user's); write the batch script there; exec the command.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#define PAYLOAD_FD 3
#define REPORT_FD 4
#define FORMAT "1"
/* What the daemon sends is bounded (a Launch is at most a few MiB); so is this. */
#define MAX_PAYLOAD (16 << 20)
#define MAX_ITEMS 100000

static char *payload;
static size_t payload_len, cursor;

static void fail(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));

/* An error number in a report, as the daemon's C library words it (taskchild.report_text):
 * the same words whichever C library built this, and the same as TaskChild's. */
static const char *why(int error) {
    static char token[24];
    snprintf(token, sizeof token, "\x01%d\x01", error);
    return token;
}

static void fail(int code, const char *fmt, ...) {
    char message[4000];
    int head = snprintf(message, sizeof message, "%d\t", code);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(message + head, sizeof message - head, fmt, ap);
    va_end(ap);
    ssize_t ignored = write(REPORT_FD, message, strlen(message));
    (void)ignored;
    _exit(code);
}

/* ---- the payload ---- */

static void read_payload(void) {
    struct stat info;
    if (fstat(PAYLOAD_FD, &info) != 0 || !S_ISREG(info.st_mode) || info.st_size > MAX_PAYLOAD)
        fail(1, "cm-task: no request on descriptor %d", PAYLOAD_FD);
    payload_len = (size_t)info.st_size;
    payload = malloc(payload_len + 1);
    if (!payload)
        fail(1, "cm-task: out of memory");
    size_t got = 0;
    while (got < payload_len) {
        ssize_t n = pread(PAYLOAD_FD, payload + got, payload_len - got, (off_t)got);
        if (n <= 0)
            fail(1, "cm-task: cannot read its request");
        got += (size_t)n;
    }
    payload[payload_len] = '\0';
    close(PAYLOAD_FD);
}

/* The next string: up to the NUL that ends it. */
static char *next_string(void) {
    char *item = payload + cursor, *end = memchr(item, '\0', payload_len - cursor);
    if (cursor >= payload_len || !end)
        fail(1, "cm-task: a malformed request");
    cursor = (size_t)(end - payload) + 1;
    return item;
}

static long next_number(long min, long max) {
    char *item = next_string(), *end;
    errno = 0;
    long value = strtol(item, &end, 10);
    if (!*item || *end || errno || value < min || value > max)
        fail(1, "cm-task: a malformed number in the request");
    return value;
}

/* A count, then that many strings: a NULL-terminated array of them. */
static char **next_strings(size_t *count) {
    size_t n = (size_t)next_number(0, MAX_ITEMS);
    char **items = calloc(n + 1, sizeof *items);
    if (!items)
        fail(1, "cm-task: out of memory");
    for (size_t i = 0; i < n; i++)
        items[i] = next_string();
    if (count)
        *count = n;
    return items;
}

/* ---- the steps ---- */

/* The kernel's struct sigaction (x86-64 and the other Linux ports that have rt_sigaction). */
struct kernel_sigaction {
    void (*handler)(int);
    unsigned long flags;
    void (*restorer)(void);
    unsigned long mask;
};

/* Every signal at its default, none blocked: as a task forked from a Python daemon would have
 * them. posix_spawn leaves the C library's own signals (32 and 33) ignored, and its signal()
 * refuses to touch them, so those are reset with the system call itself. */
static void reset_signals(void) {
    sigset_t none;
    for (int sig = 1; sig < NSIG; sig++)
        if (sig != SIGKILL && sig != SIGSTOP) {
            struct kernel_sigaction dfl = {SIG_DFL, 0, NULL, 0};
            syscall(SYS_rt_sigaction, sig, &dfl, NULL, sizeof dfl.mask);
        }
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
}

static void join_cgroups(char **files) {
    char pid[32];
    int len = snprintf(pid, sizeof pid, "%d\n", (int)getpid());
    for (char **path = files; *path; path++) {
        int fd = open(*path, O_WRONLY | O_CREAT | O_APPEND | O_NOFOLLOW | O_CLOEXEC, 0644);
        if (fd < 0 || write(fd, pid, (size_t)len) != len)
            fail(1, "cannot join the job's cgroup (%s): %s", *path, why(errno));
        close(fd);
    }
}

static void become(long uid, long gid, char **groups, size_t count) {
    gid_t *list = calloc(count + 1, sizeof *list);
    if (!list)
        fail(1, "cm-task: out of memory");
    for (size_t i = 0; i < count; i++) {
        char *end;
        errno = 0;
        long g = strtol(groups[i], &end, 10);
        if (!*groups[i] || *end || errno || g < 0 || g > UINT_MAX - 1)
            fail(1, "cm-task: a malformed group in the request");
        list[i] = (gid_t)g;
    }
    if (setgroups(count, list) != 0 || setresgid((gid_t)gid, (gid_t)gid, (gid_t)gid) != 0
        || setresuid((uid_t)uid, (uid_t)uid, (uid_t)uid) != 0)
        fail(1, "cannot become uid %ld: %s", uid, why(errno));
    free(list);
}

static int own_plain_file(const struct stat *info) {
    return S_ISREG(info->st_mode) && info->st_uid == geteuid();
}

static void require_own_plain_file(const struct stat *info, const char *workdir, const char *path) {
    if (!own_plain_file(info))
        fail(1, "%s/%s is not a plain file of uid %d's", workdir, path, (int)geteuid());
}

/* A log file of the user's: never through a link, and a plain file (a FIFO planted there
 * would block the open, a device would take the output). */
static int open_log(const char *workdir, const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_NOFOLLOW | O_NONBLOCK, 0644);
    struct stat info;
    if (fd < 0 || fstat(fd, &info) != 0)
        fail(1, "cannot write logs under %s/cmlogs: %s", workdir, why(errno));
    require_own_plain_file(&info, workdir, path);
    if (ftruncate(fd, 0) != 0 || fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK) != 0)
        fail(1, "cannot write logs under %s/cmlogs: %s", workdir, why(errno));
    return fd;
}

static void make_log_dir(const char *workdir, const char *dir) {
    if (mkdir("cmlogs", 0755) != 0 && errno != EEXIST)
        fail(1, "cannot write logs under %s/cmlogs: %s", workdir, why(errno));
    if (mkdir(dir, 0755) != 0 && errno != EEXIST)
        fail(1, "cannot write logs under %s/cmlogs: %s", workdir, why(errno));
    struct stat mine;                     /* the job's own: not a link, not another's */
    if (lstat(dir, &mine) != 0)
        fail(1, "cannot write logs under %s/cmlogs: %s", workdir, why(errno));
    if (!S_ISDIR(mine.st_mode) || mine.st_uid != geteuid())
        fail(1, "%s/%s is not a directory of %d's", workdir, dir, (int)geteuid());
}

/* The batch script as it was at submission, in the job's log directory: written under a
 * name of this rank's, then linked into place unless another rank (or attempt) put it
 * there already, so that no rank sees another's half-written copy, nor has the file it
 * executes replaced. Its path, relative to the working directory. */
static char *write_script(const char *workdir, const char *dir, long rank, const char *script, size_t len) {
    static char path[PATH_MAX], partial[PATH_MAX];
    struct stat info;
    snprintf(path, sizeof path, "%s/script", dir);
    snprintf(partial, sizeof partial, "%s/.script.%ld.%d", dir, rank, (int)getpid());
    if (lstat(path, &info) == 0 && own_plain_file(&info) && (size_t)info.st_size == len)
        return path;                      /* a copy another rank (or attempt) made: the same text */
    if (unlink(partial) != 0 && errno != ENOENT)
        goto failed;                      /* left by a killed earlier attempt of the same pid */
    int fd = open(partial, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0700);
    if (fd < 0)
        goto failed;
    for (size_t done = 0; done < len;) {
        ssize_t n = write(fd, script + done, len - done);
        if (n < 0)
            goto failed;
        done += (size_t)n;
    }
    close(fd);
    if (link(partial, path) != 0) {       /* never over a copy another rank may be executing */
        if (errno != EEXIST)
            goto failed;
        if (lstat(path, &info) != 0)
            goto failed;
        require_own_plain_file(&info, workdir, path);
    }
    if (unlink(partial) != 0)
        goto failed;
    return path;
failed:
    fail(1, "cannot write the job's script under %s/%s: %s", workdir, dir, why(errno));
}

/* Close every descriptor from first on (close_range, or one by one on a kernel before 5.9). */
static void close_from(int first) {
    if (syscall(SYS_close_range, first, ~0U, 0) == 0)
        return;
    long last = sysconf(_SC_OPEN_MAX);
    for (long fd = first; fd < (last > 0 && last < (1 << 20) ? last : (1 << 20)); fd++)
        close((int)fd);
}

static const char *env_path(char **env) {
    for (char **entry = env; *entry; entry++)
        if (strncmp(*entry, "PATH=", 5) == 0)
            return *entry + 5;
    return "/bin:/usr/bin";               /* as Python's os.defpath, without its "" (the cwd) */
}

/* execvpe with the task's own PATH (not ours: we have no environment), checking each
 * candidate with access() first; returns only on failure, with errno set. */
static void exec_from_path(const char *program, char **argv, char **env) {
    if (strchr(program, '/')) {
        execve(program, argv, env);
        return;
    }
    int first_error = 0;
    char candidate[PATH_MAX];
    const char *dirs = env_path(env);
    while (1) {
        const char *end = strchrnul(dirs, ':');
        size_t n = (size_t)(end - dirs);
        int len = n ? snprintf(candidate, sizeof candidate, "%.*s/%s", (int)n, dirs, program)
                    : snprintf(candidate, sizeof candidate, "%s", program);
        if (len > 0 && (size_t)len < sizeof candidate && access(candidate, F_OK) == 0) {
            execve(candidate, argv, env);
            if (!first_error && errno != ENOENT && errno != ENOTDIR)
                first_error = errno;      /* not executable, say: remembered, and the search goes on */
        }
        if (!*end)
            break;
        dirs = end + 1;
    }
    errno = first_error ? first_error : ENOENT;
}

int main(void) {
    reset_signals();
    read_payload();
    if (strcmp(next_string(), FORMAT) != 0)
        fail(1, "cm-task: a request of another format");
    pid_t parent = (pid_t)next_number(1, INT_MAX);
    long uid = next_number(-1, UINT_MAX - 1), gid = next_number(-1, UINT_MAX - 1);
    size_t ngroups;
    char **groups = next_strings(&ngroups);
    char **join_files = next_strings(NULL);
    char *workdir = next_string(), *dir = next_string();
    long rank = next_number(0, LONG_MAX), attempt = next_number(0, LONG_MAX);
    char *script = next_string();
    size_t script_len = strlen(script);
    size_t argc;
    char **argv = next_strings(&argc);
    char **env = next_strings(NULL);
    if (argc == 0)
        fail(1, "cm-task: a request without a command");

    setsid();                             /* a session and process group of its own */
    umask(022);
    int null = open("/dev/null", O_RDONLY);
    if (null < 0 || dup2(null, 0) != 0)
        fail(1, "cm-task: cannot open /dev/null: %s", why(errno));
    if (null != 0)                        /* started without a stdin: /dev/null took descriptor 0 */
        close(null);
    join_cgroups(join_files);             /* before anything of the job's can fork */
    if (uid >= 0)
        become(uid, gid, groups, ngroups);
    prctl(PR_SET_PDEATHSIG, SIGKILL);     /* after the switch of user, which would clear it */
    if (getppid() != parent)              /* the daemon died before that: no one reports this task */
        _exit(1);
    if (chdir(workdir) != 0)
        fail(1, "cannot enter working directory %s: %s", workdir, why(errno));
    make_log_dir(workdir, dir);
    char out_path[PATH_MAX], err_path[PATH_MAX];
    snprintf(out_path, sizeof out_path, "%s/%ld.out", dir, rank);
    snprintf(err_path, sizeof err_path, "%s/%ld.err", dir, rank);
    if (attempt > 0) {                    /* a requeued job: the attempt before keeps its output */
        char *logs[] = {out_path, err_path};
        for (int i = 0; i < 2; i++) {
            char kept[PATH_MAX + 32];
            snprintf(kept, sizeof kept, "%s.%ld", logs[i], attempt - 1);
            if (rename(logs[i], kept) != 0 && errno != ENOENT)
                fail(1, "cannot write logs under %s/cmlogs: %s", workdir, why(errno));
        }
    }
    int out = open_log(workdir, out_path), err = open_log(workdir, err_path);
    const char *program = argv[0];
    if (script_len)
        program = write_script(workdir, dir, rank, script, script_len);
    if (dup2(out, 1) != 1 || dup2(err, 2) != 2)
        fail(1, "cannot write logs under %s/cmlogs: %s", workdir, why(errno));
    if (fcntl(REPORT_FD, F_SETFD, FD_CLOEXEC) != 0)   /* closed by the exec: the daemon sees the task run */
        fail(1, "cm-task: cannot mark the report pipe close-on-exec: %s", why(errno));
    if (out > 2)
        close(out);
    if (err > 2)
        close(err);
    close_from(5);                        /* nothing of the daemon's reaches the task */
    if (script_len)
        execve(program, argv, env);
    else
        exec_from_path(program, argv, env);
    /* No such command (127, as a shell says) or not executable (126). */
    int code = errno == ENOENT ? 127 : 126, error = errno;
    dprintf(2, "cm: cannot run '%s': %s\n", argv[0], strerror(error));
    fail(code, "cannot run '%s': %s", argv[0], why(error));
}
