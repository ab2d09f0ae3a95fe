// jemalloc's configuration, read from this symbol when the process starts
// (MALLOC_CONF in the environment still overrides it):
//  - a background thread returns freed pages to the OS within about a
//    second, so the memory of a burst of calls comes back once they are gone;
//  - one arena and small thread caches: on the machines measured, they cut
//    what stays after 1e5 calls are freed from 1.40x to 1.20x the idle RSS
//    (glibc's malloc kept 2.9x). See BENCHMARKS.md.
extern "C" {
__attribute__((visibility("default"))) const char* malloc_conf =
    "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0,narenas:1,tcache_max:1024";
}
