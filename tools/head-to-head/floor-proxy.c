/* The floor proxy: the least a proxy can do between relay-load and
 * fake-soniox, for the head-to-head to put beside clio-relay and nginx.
 *
 *   cc -O2 -o floor-proxy floor-proxy.c
 *   floor-proxy LISTEN_PORT UPSTREAM_PORT WORKERS
 *
 * It accepts on 127.0.0.1:LISTEN_PORT, connects each client to
 * 127.0.0.1:UPSTREAM_PORT and copies bytes both ways: one recv and one
 * send per readiness event (epoll, edge-triggered, as nginx waits), a
 * 32 KiB read at a time, WORKERS processes on one SO_REUSEPORT port. It
 * reads no HTTP and no WebSocket frame, injects no key (relay-load sends
 * fake-soniox's key itself, as on the direct path) and re-masks nothing:
 * what it costs is the kernel's socket work and the event loop around it.
 * A send the peer's socket cannot take whole is kept, and that side is
 * not read again until it has gone, so memory stays bounded by one read
 * per connection.
 *
 * A benchmark's reference, not a product: it logs nothing and ends with
 * its parent (SIGTERM to the first process ends the workers). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

/* One side of a connection pair. */
struct end {
  int fd;
  struct end *peer;
  /* Bytes read from the peer that this side's socket has not taken yet. */
  char *pending;
  int pending_len, pending_off;
  /* Closed in this batch of events; freed after it. */
  struct end *next_dead;
};

static int ep;
static struct sockaddr_in upstream;
static struct end *dead;

static void close_pair(struct end *e) {
  struct end *p = e->peer;
  close(e->fd);
  close(p->fd);
  e->fd = p->fd = -1;
  /* Not freed yet: an event for either side may still be in this batch. */
  e->next_dead = p;
  p->next_dead = dead;
  dead = e;
}

static void bury(void) {
  while (dead) {
    struct end *e = dead;
    dead = e->next_dead;
    free(e->pending);
    free(e);
  }
}

/* Copies what `e` can read to its peer. Returns 0 if the pair closed. */
static int pump(struct end *e) {
  static char buf[32768];
  struct end *p = e->peer;
  if (e->fd < 0) return 0;
  if (p->pending_len) return 1; /* resumed by flush() */
  for (;;) {
    ssize_t n = recv(e->fd, buf, sizeof buf, 0);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
      close_pair(e);
      return 0;
    }
    if (n < 0) return 1;
    ssize_t w = send(p->fd, buf, (size_t)n, MSG_NOSIGNAL);
    if (w < 0 && errno != EAGAIN) {
      close_pair(e);
      return 0;
    }
    if (w < 0) w = 0;
    if (w < n) {
      p->pending = malloc((size_t)(n - w));
      if (!p->pending) {
        close_pair(e);
        return 0;
      }
      memcpy(p->pending, buf + w, (size_t)(n - w));
      p->pending_len = (int)(n - w);
      p->pending_off = 0;
      return 1;
    }
    /* A short read drained the socket: the next bytes bring an event. */
    if (n < (ssize_t)sizeof buf) return 1;
  }
}

/* Sends what `e` kept; once all has gone, reads its peer again. */
static int flush(struct end *e) {
  while (e->pending_len) {
    ssize_t w = send(e->fd, e->pending + e->pending_off, (size_t)e->pending_len, MSG_NOSIGNAL);
    if (w < 0 && errno == EAGAIN) return 1;
    if (w < 0) {
      close_pair(e);
      return 0;
    }
    e->pending_off += (int)w;
    e->pending_len -= (int)w;
  }
  free(e->pending);
  e->pending = NULL;
  return pump(e->peer);
}

static struct end *watch(int fd) {
  struct end *e = calloc(1, sizeof *e);
  if (!e) return NULL;
  e->fd = fd;
  struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = e};
  if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev)) {
    free(e);
    return NULL;
  }
  return e;
}

static void accept_all(int ls) {
  int one = 1, c;
  while ((c = accept4(ls, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
    int u = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    /* Non-blocking: bytes the client sends first wait as a kept send
     * until the connection is up (its EPOLLOUT flushes them). */
    if (u < 0 || (connect(u, (struct sockaddr *)&upstream, sizeof upstream) && errno != EINPROGRESS)) {
      close(c);
      if (u >= 0) close(u);
      continue;
    }
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    setsockopt(u, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct end *x = watch(c), *y = x ? watch(u) : NULL;
    if (!y) {
      free(x);
      close(c);
      close(u);
      continue;
    }
    x->peer = y;
    y->peer = x;
  }
}

static void worker(int port) {
  int one = 1, ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
  setsockopt(ls, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  if (bind(ls, (struct sockaddr *)&a, sizeof a) || listen(ls, 4096)) {
    perror("floor-proxy: listen");
    exit(1);
  }
  ep = epoll_create1(0);
  struct epoll_event lev = {.events = EPOLLIN, .data.ptr = NULL};
  epoll_ctl(ep, EPOLL_CTL_ADD, ls, &lev);
  struct epoll_event evs[512];
  for (;;) {
    int n = epoll_wait(ep, evs, 512, -1);
    for (int i = 0; i < n; i++) {
      struct end *e = evs[i].data.ptr;
      if (!e) {
        accept_all(ls);
        continue;
      }
      if (e->fd < 0) continue;
      if ((evs[i].events & EPOLLOUT) && e->pending_len && !flush(e)) continue;
      if (evs[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLERR | EPOLLHUP)) pump(e);
    }
    bury();
  }
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: floor-proxy LISTEN_PORT UPSTREAM_PORT WORKERS\n");
    return 2;
  }
  upstream.sin_family = AF_INET;
  upstream.sin_port = htons((unsigned short)atoi(argv[2]));
  inet_pton(AF_INET, "127.0.0.1", &upstream.sin_addr);
  int workers = atoi(argv[3]);
  for (int i = 0; i < workers; i++) {
    if (fork() == 0) {
      prctl(PR_SET_PDEATHSIG, SIGTERM);
      if (getppid() == 1) return 0; /* the parent is already gone */
      worker(atoi(argv[1]));
      return 0;
    }
  }
  while (wait(NULL) > 0) {
  }
  return 0;
}
