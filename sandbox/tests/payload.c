/*
 * Payloads for the vzero-sandbox ctest suite: one small C program, one behaviour per mode.
 *   hello             print a line, exit 0 (a normal program must run)
 *   loop              spin forever (wall-clock / CPU limits)
 *   forkbomb          fork forever, children too (process limit)
 *   memhog            allocate and touch 16 MiB at a time forever (memory limit, measured)
 *   bigalloc          malloc(64 GiB); abort() when refused, as Rust does (memory limit, inferred)
 *   write PATH        create PATH; exit 0 if it worked, 3 with the error if it was refused
 *   connect IP PORT   open a TCP connection; exit 0 if it worked, 3 with the error if refused
 *   flood             write to stdout forever (output limit)
 *   env               print the environment, its size and the working directory
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    if (!strcmp(mode, "hello")) {
        printf("hello from the sandbox\n");
        return 0;
    }
    if (!strcmp(mode, "loop")) {
        for (volatile unsigned long i = 0;; i++) {
        }
    }
    if (!strcmp(mode, "forkbomb")) {
        for (;;) fork();
    }
    if (!strcmp(mode, "memhog")) {
        for (;;) {
            char *p = malloc(16 << 20);
            if (!p) return 2;
            memset(p, 1, 16 << 20);
        }
    }
    if (!strcmp(mode, "bigalloc")) {
        char *p = malloc(64UL << 30);
        if (!p) abort();
        p[0] = 1;
        return 0;
    }
    if (!strcmp(mode, "write") && argc > 2) {
        int fd = open(argv[2], O_WRONLY | O_CREAT | O_EXCL, 0644);
        if (fd < 0) {
            printf("write %s: %s\n", argv[2], strerror(errno));
            return 3;
        }
        close(fd);
        printf("wrote %s\n", argv[2]);
        return 0;
    }
    if (!strcmp(mode, "connect") && argc > 3) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) {
            printf("socket: %s\n", strerror(errno));
            return 3;
        }
        struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)atoi(argv[3]))};
        inet_pton(AF_INET, argv[2], &a.sin_addr);
        if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
            printf("connect: %s\n", strerror(errno));
            return 3;
        }
        printf("connected\n");
        return 0;
    }
    if (!strcmp(mode, "flood")) {
        static char block[65536];
        memset(block, 'x', sizeof block);
        for (;;)
            if (write(1, block, sizeof block) < 0) return 2;
    }
    if (!strcmp(mode, "env")) {
        char cwd[4096];
        int n = 0;
        for (char **e = environ; *e; e++, n++) printf("%s\n", *e);
        printf("nenv=%d\n", n);
        printf("cwd=%s\n", getcwd(cwd, sizeof cwd) ? cwd : "?");
        return 0;
    }
    fprintf(stderr, "usage: payload hello|loop|forkbomb|memhog|bigalloc|write PATH|connect IP PORT|flood|env\n");
    return 2;
}
