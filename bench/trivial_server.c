/*
 * trivial_server: the cheapest possible policy server, to measure the load
 * generator's own ceiling. It answers "action=DUNNO" to every request (every
 * empty line) on every connection, single-threaded with epoll, and parses
 * nothing else.
 *
 * Built by bench/run.py as: cc -O2 -o build/trivial_server bench/trivial_server.c
 * Usage: trivial_server PORT   (listens on 127.0.0.1; prints "ready" once listening)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

static const char reply[] = "action=DUNNO\n\n";

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: trivial_server PORT\n");
        return 2;
    }
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1]))};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(listener, 4096) < 0) {
        perror("listen");
        return 1;
    }
    int epfd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = listener};
    epoll_ctl(epfd, EPOLL_CTL_ADD, listener, &ev);
    /* The last byte seen per fd, so an empty line split across reads counts. */
    static char last[65536];
    printf("ready\n");
    fflush(stdout);
    struct epoll_event events[256];
    char buf[16384], out[sizeof reply * 64];
    for (;;) {
        int n = epoll_wait(epfd, events, 256, -1);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == listener) {
                int c;
                while ((c = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)) >= 0) {
                    if (c >= (int)sizeof last) {
                        close(c);
                        continue;
                    }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    last[c] = 0;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = c};
                    epoll_ctl(epfd, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t got = read(fd, buf, sizeof buf);
            if (got <= 0) {
                if (got < 0 && errno == EAGAIN)
                    continue;
                close(fd);
                continue;
            }
            size_t answers = 0;
            char prev = last[fd];
            for (ssize_t k = 0; k < got; k++) {
                if (buf[k] == '\n' && prev == '\n') {
                    answers++;
                    prev = 0; /* "\n\n\n" is one request end, not two */
                } else {
                    prev = buf[k];
                }
            }
            last[fd] = prev;
            size_t len = 0;
            while (answers-- && len + sizeof reply < sizeof out) {
                memcpy(out + len, reply, sizeof reply - 1);
                len += sizeof reply - 1;
            }
            if (len && write(fd, out, len) < 0)
                close(fd);
        }
    }
}
