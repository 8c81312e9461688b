/*
 * foreign_read: the baseline for xendbg's guest-memory reads on Xen.
 *
 *   foreign_read DOMID FIRST_FRAME PAGES_PER_READ READS
 *
 * Reads PAGES_PER_READ guest frames from FIRST_FRAME, READS times, the way
 * xendbg's XenDomain.read_phys does: one xenforeignmemory_map of the whole
 * range (in chunks of 1024 pages), every per-page error checked, a copy out,
 * xenforeignmemory_unmap. Frames are GFNs for HVM/PVH guests, MFNs for PV.
 * Prints one line: "reads=N bytes=N seconds=F mib_per_s=F us_per_read=F".
 *
 * Build (dom0, libxen-dev): gcc -O2 -o foreign_read foreign_read.c -lxenforeignmemory
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <xenforeignmemory.h>

#define PAGE_SIZE 4096
#define CHUNK_PAGES 1024 /* xendbg's MAP_CHUNK_PAGES */

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int read_range(xenforeignmemory_handle *fmem, unsigned domid, xen_pfn_t first,
                      size_t pages, char *out, xen_pfn_t *frames, int *err)
{
    for (size_t done = 0; done < pages; done += CHUNK_PAGES) {
        size_t n = pages - done < CHUNK_PAGES ? pages - done : CHUNK_PAGES;
        for (size_t i = 0; i < n; i++)
            frames[i] = first + done + i;
        void *map = xenforeignmemory_map(fmem, domid, PROT_READ, n, frames, err);
        if (!map) {
            fprintf(stderr, "xenforeignmemory_map: %s\n", strerror(errno));
            return -1;
        }
        for (size_t i = 0; i < n; i++) {
            if (err[i]) {
                fprintf(stderr, "frame %#lx: %s\n", (unsigned long)frames[i], strerror(-err[i]));
                xenforeignmemory_unmap(fmem, map, n);
                return -1;
            }
        }
        memcpy(out + done * PAGE_SIZE, map, n * PAGE_SIZE);
        xenforeignmemory_unmap(fmem, map, n);
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: %s DOMID FIRST_FRAME PAGES_PER_READ READS\n", argv[0]);
        return 2;
    }
    unsigned domid = strtoul(argv[1], NULL, 0);
    xen_pfn_t first = strtoull(argv[2], NULL, 0);
    size_t pages = strtoull(argv[3], NULL, 0);
    long reads = strtol(argv[4], NULL, 0);
    if (pages == 0 || reads <= 0) {
        fprintf(stderr, "PAGES_PER_READ and READS must be positive\n");
        return 2;
    }
    xenforeignmemory_handle *fmem = xenforeignmemory_open(NULL, 0);
    if (!fmem) {
        fprintf(stderr, "xenforeignmemory_open: %s\n", strerror(errno));
        return 1;
    }
    char *buf = malloc(pages * PAGE_SIZE);
    xen_pfn_t *frames = calloc(CHUNK_PAGES, sizeof(*frames));
    int *err = calloc(CHUNK_PAGES, sizeof(*err));
    if (!buf || !frames || !err) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    unsigned long checksum = 0; /* keeps the copies observable */
    double start = now();
    for (long r = 0; r < reads; r++) {
        if (read_range(fmem, domid, first, pages, buf, frames, err))
            return 1;
        checksum += (unsigned char)buf[r % (pages * PAGE_SIZE)];
    }
    double seconds = now() - start;
    double bytes = (double)reads * pages * PAGE_SIZE;
    printf("reads=%ld bytes=%.0f seconds=%.6f mib_per_s=%.2f us_per_read=%.2f checksum=%lu\n",
           reads, bytes, seconds, bytes / seconds / (1 << 20), seconds / reads * 1e6, checksum);
    xenforeignmemory_close(fmem);
    return 0;
}
