/* A workload of known shape for Fathom's kernel tests and benchmarks.
 *
 *   workload COMM MODE N [ARG]
 *
 * sets its command name to COMM, optionally waits for a byte on stdin (FATHOM_WL_WAIT=1, so
 * a test can attach with this pid first), then does exactly N of MODE:
 *   open PATH    N openat+close of PATH
 *   exec         N fork+exec of /bin/true
 *   connect      N TCP connects to a loopback listener it opens itself
 *   udp PORT     N 100-byte UDP datagrams to itself on 127.0.0.1:PORT, each received
 *   udp IP:PORT  N 100-byte UDP datagrams to IP:PORT, 1 ms apart
 *   call         N calls of fathom_target() (a uprobe target)
 *   usdt         N hits of USDT probe fathom:tick
 *   getppid      N getppid() syscalls
 *   sleep        N sleeps of 1 ms (N wakeups)
 *   spin         busy loop in fathom_hot_loop() for N milliseconds (a profile target)
 *   write PATH   N 4 KiB writes + fdatasync of PATH (block I/O)
 *   pace SECS    getppid() at N calls per second for SECS seconds (a steady flood)
 * and prints "done N".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* A SystemTap-compatible USDT note without <sys/sdt.h>: the probe site is a nop whose
 * address, with provider and name, is recorded in .note.stapsdt. */
#define FATHOM_USDT(provider, name)                                              \
  __asm__ __volatile__("990: nop\n"                                              \
                       ".pushsection .note.stapsdt,\"?\",\"note\"\n"            \
                       ".balign 4\n"                                             \
                       ".4byte 992f-991f, 994f-993f, 3\n"                        \
                       "991: .asciz \"stapsdt\"\n"                               \
                       "992: .balign 4\n"                                        \
                       "993: .8byte 990b\n"                                      \
                       ".8byte _.stapsdt.base\n"                                 \
                       ".8byte 0\n"                                              \
                       ".asciz \"" #provider "\"\n"                              \
                       ".asciz \"" #name "\"\n"                                  \
                       ".asciz \"\"\n"                                           \
                       "994: .balign 4\n"                                        \
                       ".popsection\n"                                           \
                       ".ifndef _.stapsdt.base\n"                                \
                       ".pushsection .stapsdt.base,\"aG\",\"progbits\",.stapsdt.base,comdat\n" \
                       ".weak _.stapsdt.base\n"                                  \
                       ".hidden _.stapsdt.base\n"                                \
                       "_.stapsdt.base: .space 1\n"                              \
                       ".size _.stapsdt.base, 1\n"                               \
                       ".popsection\n"                                           \
                       ".endif\n")

volatile unsigned long sink;

__attribute__((noinline)) unsigned long fathom_target(unsigned long i) {
  __asm__ __volatile__("" ::: "memory");
  sink += i;
  return i * 2;
}

__attribute__((noinline)) void fathom_hot_loop(long ms) {
  struct timespec start, now;
  clock_gettime(CLOCK_MONOTONIC, &start);
  for (;;) {
    for (int i = 0; i < 100000; i++) sink += i;
    clock_gettime(CLOCK_MONOTONIC, &now);
    long elapsed = (now.tv_sec - start.tv_sec) * 1000 + (now.tv_nsec - start.tv_nsec) / 1000000;
    if (elapsed >= ms) return;
  }
}

static int die(const char *what) {
  perror(what);
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: workload COMM MODE N [ARG]\n");
    return 2;
  }
  prctl(PR_SET_NAME, argv[1], 0, 0, 0);
  const char *mode = argv[2];
  long n = atol(argv[3]);
  const char *arg = argc > 4 ? argv[4] : "/dev/null";
  if (getenv("FATHOM_WL_WAIT")) {
    printf("ready %d\n", getpid());
    fflush(stdout);
    char c;
    if (read(0, &c, 1) != 1) return die("read stdin");
  }
  if (!strcmp(mode, "open")) {
    for (long i = 0; i < n; i++) {
      int fd = openat(AT_FDCWD, arg, O_RDONLY);
      if (fd >= 0) close(fd);
    }
  } else if (!strcmp(mode, "exec")) {
    /* Runs ARG (default /bin/true) N times. */
    const char *prog = argc > 4 ? argv[4] : "/bin/true";
    for (long i = 0; i < n; i++) {
      pid_t p = fork();
      if (p == 0) {
        execl(prog, "true", (char *)NULL);
        _exit(127);
      }
      int st;
      waitpid(p, &st, 0);
    }
  } else if (!strcmp(mode, "connect")) {
    int l = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof a;
    if (l < 0 || bind(l, (struct sockaddr *)&a, sizeof a) || listen(l, 128) ||
        getsockname(l, (struct sockaddr *)&a, &len))
      return die("listen");
    for (long i = 0; i < n; i++) {
      int c = socket(AF_INET, SOCK_STREAM, 0);
      if (connect(c, (struct sockaddr *)&a, sizeof a)) return die("connect");
      int s = accept(l, NULL, NULL);
      close(s);
      close(c);
    }
    printf("port %d\n", ntohs(a.sin_port));
  } else if (!strcmp(mode, "udp")) {
    /* N datagrams of 100 bytes: ARG "PORT" sends them to itself over loopback, each one
       received before the next is sent; ARG "IPV4:PORT" sends them there, 1 ms apart. */
    const char *colon = argc > 4 ? strchr(argv[4], ':') : NULL;
    int port = atoi(colon ? colon + 1 : (argc > 4 ? argv[4] : "0"));
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port),
                            .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (colon) {
      char host[64];
      snprintf(host, sizeof host, "%.*s", (int)(colon - argv[4]), argv[4]);
      if (inet_pton(AF_INET, host, &a.sin_addr) != 1) return die("udp address");
    }
    int r = socket(AF_INET, SOCK_DGRAM, 0), t = socket(AF_INET, SOCK_DGRAM, 0);
    if (r < 0 || t < 0 || (!colon && bind(r, (struct sockaddr *)&a, sizeof a)))
      return die("udp bind");
    char buf[100];
    memset(buf, 7, sizeof buf);
    for (long i = 0; i < n; i++) {
      if (sendto(t, buf, sizeof buf, 0, (struct sockaddr *)&a, sizeof a) != sizeof buf)
        return die("sendto");
      if (colon) {
        struct timespec ms = {0, 1000000};
        nanosleep(&ms, NULL);
      } else if (recv(r, buf, sizeof buf, 0) != sizeof buf) {
        return die("recv");
      }
    }
  } else if (!strcmp(mode, "call")) {
    for (long i = 0; i < n; i++) fathom_target((unsigned long)i);
  } else if (!strcmp(mode, "usdt")) {
    for (long i = 0; i < n; i++) {
      FATHOM_USDT(fathom, tick);
      sink++;
    }
  } else if (!strcmp(mode, "prctl")) {
    /* What prctl(2) answers, N times: the dumpable flag (1) and this process's name, which
     * PR_SET_NAME above set (an LSM program that changes task_prctl's verdict breaks both). */
    char name[17] = {0};
    for (long i = 0; i < n; i++) {
      int dumpable = prctl(PR_GET_DUMPABLE, 0, 0, 0, 0);
      if (prctl(PR_GET_NAME, name, 0, 0, 0) != 0) return die("PR_GET_NAME");
      printf("dumpable=%d name=%s\n", dumpable, name);
    }
  } else if (!strcmp(mode, "sleep")) {
    /* N sleeps of 1 ms: N timer wakeups, each followed by a switch back onto a CPU. */
    for (long i = 0; i < n; i++) {
      struct timespec ms = {0, 1000000};
      nanosleep(&ms, NULL);
    }
  } else if (!strcmp(mode, "getppid")) {
    for (long i = 0; i < n; i++) syscall(SYS_getppid);
  } else if (!strcmp(mode, "spin")) {
    fathom_hot_loop(n);
  } else if (!strcmp(mode, "pace")) {
    long secs = atol(arg);
    struct timespec start, now;
    clock_gettime(CLOCK_MONOTONIC, &start);
    long done = 0;
    for (;;) {
      clock_gettime(CLOCK_MONOTONIC, &now);
      double t = (now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9;
      if (t >= secs) break;
      long due = (long)(t * n);
      while (done < due) {
        syscall(SYS_getppid);
        done++;
      }
      struct timespec nap = {0, 200000};
      nanosleep(&nap, NULL);
    }
    n = done;
  } else if (!strcmp(mode, "write")) {
    int fd = open(arg, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return die("open");
    char buf[4096];
    memset(buf, 'x', sizeof buf);
    for (long i = 0; i < n; i++) {
      if (write(fd, buf, sizeof buf) != sizeof buf) return die("write");
      fdatasync(fd);
    }
    close(fd);
  } else {
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
  }
  printf("done %ld\n", n);
  return 0;
}
