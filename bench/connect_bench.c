/* connect_bench: time N blocking connect() calls from the caller's netns and
 * cgroup, so the cost of cgroup/connect4 + sockops hooks can be read off.
 *
 * usage: connect_bench N LISTEN_IP LISTEN_PORT DST_IP DST_PORT
 *
 * It listens on LISTEN_IP:LISTEN_PORT itself and connects N times to
 * DST_IP:DST_PORT (equal to the listen address, or an address the hook
 * rewrites to it). Each client socket is closed with SO_LINGER 0 (RST, no
 * TIME_WAIT, so ports never run out); the accepted end is closed too.
 * Prints one JSON line: nanosecond percentiles of connect() alone.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static int cmp(const void *a, const void *b)
{
	unsigned long x = *(const unsigned long *)a, y = *(const unsigned long *)b;
	return x < y ? -1 : x > y;
}

static unsigned long now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (unsigned long)ts.tv_sec * 1000000000ul + ts.tv_nsec;
}

int main(int argc, char **argv)
{
	if (argc != 6) {
		fprintf(stderr, "usage: %s N LISTEN_IP LISTEN_PORT DST_IP DST_PORT\n", argv[0]);
		return 2;
	}
	long n = atol(argv[1]);
	struct sockaddr_in la = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
	struct sockaddr_in da = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[5]))};
	if (n <= 0 || inet_pton(AF_INET, argv[2], &la.sin_addr) != 1 ||
	    inet_pton(AF_INET, argv[4], &da.sin_addr) != 1) {
		fprintf(stderr, "bad arguments\n");
		return 2;
	}
	int one = 1, l = socket(AF_INET, SOCK_STREAM, 0);
	setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(l, (struct sockaddr *)&la, sizeof(la)) || listen(l, 4096)) {
		perror("listen");
		return 1;
	}
	unsigned long *ns = malloc(n * sizeof(*ns));
	struct linger lg = {.l_onoff = 1, .l_linger = 0};
	for (long i = 0; i < n; i++) {
		int s = socket(AF_INET, SOCK_STREAM, 0);
		setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
		unsigned long t0 = now_ns();
		if (connect(s, (struct sockaddr *)&da, sizeof(da))) {
			fprintf(stderr, "connect #%ld: %s\n", i, strerror(errno));
			return 1;
		}
		ns[i] = now_ns() - t0;
		int c = accept(l, NULL, NULL);
		if (c < 0) {
			perror("accept");
			return 1;
		}
		close(s);
		close(c);
	}
	qsort(ns, n, sizeof(*ns), cmp);
	double sum = 0;
	for (long i = 0; i < n; i++)
		sum += ns[i];
	printf("{\"n\":%ld,\"min\":%lu,\"p50\":%lu,\"p90\":%lu,\"p99\":%lu,\"mean\":%.1f}\n", n,
	       ns[0], ns[n / 2], ns[n * 9 / 10], ns[n * 99 / 100], sum / n);
	return 0;
}
