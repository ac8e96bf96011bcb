/* The identity of mscope's compiled helpers (_native.so = native.c + values/statkernel.c + readers/pickle/picklescan.c).
 *
 * hatch_build.py compiles with -DMSCOPE_SOURCE_HASH="<sha256 of the C sources>" (native.source_hash),
 * and native.py loads the library only when this string equals the hash of the sources it ships
 * beside it: a build left over from older sources is ignored (the Python fallbacks run) with no
 * version number to bump by hand. A build without the define never matches.
 */
#ifndef MSCOPE_SOURCE_HASH
#define MSCOPE_SOURCE_HASH "unknown"
#endif

const char *mscope_source_hash(void) { return MSCOPE_SOURCE_HASH; }
