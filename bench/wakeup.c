/* wakeup.c: what one hand-off between two processes costs on this host.
 *
 * Two processes pass one byte back and forth over two pipes, N round trips;
 * prints {"round_trips": N, "ns_per_handoff": ...} (a round trip is two
 * hand-offs: each wakes the other process and goes to sleep itself). No CPU
 * pinning: the scheduler places them as it places wrk, the sidecars and the
 * app. A request through both sidecars at few connections is a chain of such
 * hand-offs (bench/loadsuite.py measures it next to the load matrix).
 *
 * usage: wakeup N
 */
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static void xfer(int rfd, int wfd, int first, long n)
{
	char c = 0;

	for (long i = 0; i < n; i++) {
		if (first && write(wfd, &c, 1) != 1)
			exit(2);
		if (read(rfd, &c, 1) != 1)
			exit(2);
		if (!first && write(wfd, &c, 1) != 1)
			exit(2);
	}
}

int main(int argc, char **argv)
{
	int ab[2], ba[2];
	long n = argc > 1 ? atol(argv[1]) : 20000;
	struct timespec t0, t1;

	if (n <= 0 || pipe(ab) || pipe(ba))
		return 2;
	pid_t pid = fork();

	if (pid < 0)
		return 2;
	if (pid == 0) {
		xfer(ab[0], ba[1], 0, n);
		_exit(0);
	}
	clock_gettime(CLOCK_MONOTONIC, &t0);
	xfer(ba[0], ab[1], 1, n);
	clock_gettime(CLOCK_MONOTONIC, &t1);
	int st;

	if (waitpid(pid, &st, 0) != pid || !WIFEXITED(st) || WEXITSTATUS(st))
		return 2;
	double ns = (t1.tv_sec - t0.tv_sec) * 1e9 + (t1.tv_nsec - t0.tv_nsec);

	printf("{\"round_trips\": %ld, \"ns_per_handoff\": %.0f}\n", n, ns / n / 2);
	return 0;
}
