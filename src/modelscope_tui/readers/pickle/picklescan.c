/* mscope's pickle pre-scan in C: the same walk as scan.scan_exact, 50x faster.
 *
 * Why it exists: before CPython's C unpickler sees a pickle from a file, every opcode is walked
 * once to check lengths and memo indices against the bytes present and to bound the memory,
 * nesting and hash-flooding keys of the objects it would build (see scan.scan_pickle). In
 * Python that walk takes 1.8 s of a 100k-tensor state_dict; here 25 ms.
 *
 * It knows no opcodes itself: scan.py passes the columns of opcodes.OPCODES (each byte's
 * argument kind and width, object cost, nesting mode, stack effect, hashiness and key role), so
 * there is one description of the pickle format. token() reads arguments exactly as
 * opcodes.tokens does. Any refusal returns -1 and Python walks the pickle again to word the
 * error; this loop must accept exactly what scan_exact accepts (tests hold them equal on random,
 * mutated and grammar-built pickles).
 *
 * Every read is checked against `len`: the input is hostile.
 *
 * A stale build is ignored by its source hash (native.c), so there is no version to bump.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Argument kinds (opcodes.ARG_*); a fixed argument's or a count's width comes beside it. */
enum { ARG_NONE, ARG_FIXED, ARG_COUNT, ARG_COUNT_SIGNED, ARG_LINE, ARG_TWO_LINES, ARG_INVALID };

#define MAX_LINE 4096 /* opcodes.MAX_LINE */
#define STOP 0x2E

/* Nesting modes (opcodes.NEST_*): how an opcode changes the depth of the stack's objects. */
enum { N_PLAIN, N_MARK, N_TO_MARK, N_INTO_MARK, N_POP_MARK, N_INTO, N_DUP, N_GET, N_PUT, N_MEMOIZE };
#define MARK_DEPTH (-1)
/* Key roles (opcodes.KEYS_*): where an opcode's dict keys or set members are. A stack
 * slot holds depth << 1 | hashy (scan.MAX_HASHED_KEYS: a hash the file can choose). */
enum { K_ROLE_NONE, K_ROLE_SECOND, K_ROLE_EVEN, K_ROLE_ALL };
#define LONG1 0x8A

/* Growable int32 arrays for the depth stack and the memo's depths. */
typedef struct { int32_t *v; int64_t n, cap; } vec;

static int vec_reserve(vec *a, int64_t want, int32_t fill) {
    if (want <= a->cap) return 0;
    int64_t cap = a->cap ? a->cap : 64;
    while (cap < want) cap *= 2;
    int32_t *v = realloc(a->v, (size_t)cap * sizeof(int32_t));
    if (!v) return -1;
    for (int64_t i = a->cap; i < cap; i++) v[i] = fill;
    a->v = v;
    a->cap = cap;
    return 0;
}

static int push(vec *a, int32_t x) {
    if (vec_reserve(a, a->n + 1, 0)) return -1;
    a->v[a->n++] = x;
    return 0;
}

/* Pop up to `count` objects (never a MARK): one more than the deepest of them, 0 for none. */
static int32_t pop_objects(vec *s, int count) {
    int32_t depth = 0;
    for (int i = 0; i < count && s->n && s->v[s->n - 1] != MARK_DEPTH; i++) {
        int32_t d = (s->v[--s->n] >> 1) + 1;
        if (d > depth) depth = d;
    }
    return depth;
}

static uint64_t le(const uint8_t *p, int n) {
    uint64_t v = 0;
    for (int i = n - 1; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

/* First '\n' in [from, min(from + span, len)), or -1 (bytes.find with an end bound). */
static int64_t find_newline(const uint8_t *data, int64_t len, int64_t from, int64_t span) {
    if (from < 0 || from >= len) return -1;
    int64_t stop = len - from < span ? len : from + span;
    const uint8_t *hit = memchr(data + from, '\n', (size_t)(stop - from));
    return hit ? (int64_t)(hit - data) : -1;
}

/* One opcode's argument, read as opcodes.tokens reads it: the offset of the next opcode, or -1
 * when the argument is malformed (truncated, a negative length, no newline within MAX_LINE).
 * *arg gets a fixed argument's value (as unsigned: only memo indices are used), the offset where
 * a counted or text argument's bytes start, or for two lines the offset of the first newline. */
static int64_t token(const uint8_t *data, int64_t len, int64_t pos, int kind, int width, int64_t *arg) {
    pos += 1; /* past the opcode */
    switch (kind) {
    case ARG_NONE:
        return pos;
    case ARG_FIXED:
        if (len - pos < width) return -1;
        *arg = (int64_t)le(data + pos, width);
        return pos + width;
    case ARG_COUNT:
    case ARG_COUNT_SIGNED: {
        if (len - pos < width) return -1;
        const uint64_t n = le(data + pos, width);
        if (kind == ARG_COUNT_SIGNED && (n & 0x80000000u)) return -1; /* negative length */
        pos += width;
        if (n > (uint64_t)(len - pos)) return -1;
        *arg = pos;
        return pos + (int64_t)n;
    }
    case ARG_LINE: {
        const int64_t nl = find_newline(data, len, pos, MAX_LINE);
        if (nl < 0) return -1;
        *arg = pos;
        return nl + 1;
    }
    case ARG_TWO_LINES: {
        const int64_t first = find_newline(data, len, pos, MAX_LINE);
        if (first < 0) return -1;
        const int64_t second = find_newline(data, len, first + 1, MAX_LINE);
        if (second < 0) return -1;
        *arg = first;
        return second + 1;
    }
    default:
        return -1; /* not an opcode */
    }
}

/* The memo index a GET or PUT names (scan._memo_index): its fixed argument, or its text line
 * when that is 1 to 11 decimal digits; -1 otherwise. */
static int64_t memo_index(const uint8_t *data, int kind, int64_t arg, int64_t next) {
    if (next < 0) return -1;
    if (kind != ARG_LINE) return arg;
    const int64_t n = next - 1 - arg;
    if (n < 1 || n >= 12) return -1;
    int64_t index = 0;
    for (int64_t i = arg; i < next - 1; i++) {
        if (data[i] < '0' || data[i] > '9') return -1;
        index = index * 10 + (data[i] - '0');
    }
    return index;
}

/* End offset (just past STOP) of the pickle at data[start], or -1 when scan_exact refuses it.
 * The depth and hash rules are scan.scan_exact's (see MAX_NESTING and MAX_HASHED_KEYS there). */
static int64_t scan(const uint8_t *data, int64_t len, int64_t start, const int8_t *kinds,
                    const int8_t *widths, const int32_t *costs, int64_t memory_ratio, int64_t min_memory,
                    const int8_t *modes, const int8_t *npops, const int8_t *npushes,
                    int64_t max_nesting, const int8_t *hashy, const int8_t *key_role,
                    int64_t max_hashed, vec *depths, vec *memo) {
    if (start < 0 || start > len) return -1;
    const int64_t limit = len - start;
    int64_t pos = start, top = 0, cost = 0, hashed = 0;
    int32_t deepest = 0;
    int64_t memo_len = 0; /* filled memo slots: where MEMOIZE stores, as in CPython */
    while (pos < len) {
        const uint8_t code = data[pos];
        const int kind = kinds[code];
        int64_t arg = 0;
        const int64_t next = token(data, len, pos, kind, widths[code], &arg);
        cost += costs[code];
        const int mode = modes[code];
        if (mode == N_PLAIN) {
            int32_t d = pop_objects(depths, npops[code]);
            int32_t h = hashy[code];
            if (code == LONG1 && next >= 0 && next - arg >= 8) h = 1;
            for (int i = 0; i < npushes[code]; i++)
                if (push(depths, (d << 1) | h)) return -1;
            if (npushes[code] && d > deepest) deepest = d;
        } else if (mode == N_MARK) {
            if (push(depths, MARK_DEPTH)) return -1;
        } else if (mode == N_INTO) {
            if (key_role[code] == K_ROLE_SECOND && depths->n >= 2 && depths->v[depths->n - 2] != MARK_DEPTH)
                hashed += depths->v[depths->n - 2] & 1;
            int32_t d = pop_objects(depths, npops[code]);
            if (depths->n && depths->v[depths->n - 1] != MARK_DEPTH && d > (depths->v[depths->n - 1] >> 1)) {
                depths->v[depths->n - 1] = (d << 1) | (depths->v[depths->n - 1] & 1);
                if (d > deepest) deepest = d;
            }
        } else if (mode == N_GET || mode == N_PUT) {
            const int64_t index = memo_index(data, kind, arg, next);
            if (mode == N_GET) {
                int32_t slot = (deepest << 1) | 1;  /* never stored: as deep as anything, hashy */
                if (index >= 0 && index < memo->cap && memo->v[index] != MARK_DEPTH) slot = memo->v[index];
                if (push(depths, slot)) return -1;
            } else if (depths->n && depths->v[depths->n - 1] != MARK_DEPTH && index >= 0) {
                /* LONG_BINPUT and PUT past the limit are refused below; BINPUT stays under 256 */
                if (index > limit && index > 255) return -1;
                if (vec_reserve(memo, index + 1, MARK_DEPTH)) return -1;
                if (memo->v[index] == MARK_DEPTH) memo_len++;
                memo->v[index] = depths->v[depths->n - 1];
            }
        } else if (mode == N_DUP) {
            if (depths->n && push(depths, depths->v[depths->n - 1])) return -1;
        } else if (mode == N_MEMOIZE) {
            if (depths->n && depths->v[depths->n - 1] != MARK_DEPTH) {
                if (memo_len > limit) return -1; /* more entries than bytes: cannot happen */
                if (vec_reserve(memo, memo_len + 1, MARK_DEPTH)) return -1;
                const int fresh = memo->v[memo_len] == MARK_DEPTH;
                memo->v[memo_len] = depths->v[depths->n - 1];
                if (fresh) memo_len++;
            }
        } else {  /* to the mark */
            int32_t d = 0;
            const int role = key_role[code];
            int64_t items = 0, flagged_odd = 0, flagged_even = 0;  /* counted from the top */
            while (depths->n) {
                int32_t t = depths->v[--depths->n];
                if (t == MARK_DEPTH) break;
                if ((t >> 1) + 1 > d) d = (t >> 1) + 1;
                if (t & 1) {
                    if (items & 1) flagged_odd++; else flagged_even++;
                }
                items++;
            }
            if (role == K_ROLE_ALL) {
                hashed += flagged_odd + flagged_even;
            } else if (role == K_ROLE_EVEN) {  /* keys at even offsets from the mark */
                hashed += (items & 1) ? flagged_even : flagged_odd;
            }
            if (mode == N_TO_MARK) {
                if (push(depths, (d << 1) | hashy[code])) return -1;
            } else if (mode == N_INTO_MARK && depths->n && depths->v[depths->n - 1] != MARK_DEPTH &&
                       d > (depths->v[depths->n - 1] >> 1)) {
                depths->v[depths->n - 1] = (d << 1) | (depths->v[depths->n - 1] & 1);
            }
            if (d > deepest) deepest = d;
        }
        if (hashed > max_hashed) return -1;
        if (deepest > max_nesting) return -1;
        if (next < 0) return -1; /* a malformed argument */
        if (kind == ARG_COUNT || kind == ARG_COUNT_SIGNED) {
            cost += 2 * (next - arg);
        } else if (kind == ARG_LINE) {
            cost += 2 * (next - 1 - arg);
        }
        if (mode == N_PUT && kind == ARG_LINE) { /* PUT: any number of digits, at most limit */
            if (next - 1 == arg) return -1;  /* b"".isdigit() is False */
            int64_t index = 0;
            for (int64_t i = arg; i < next - 1; i++) {
                if (data[i] < '0' || data[i] > '9') return -1;
                index = index * 10 + (data[i] - '0');
                if (index > limit) return -1;
            }
            if (index > top) top = index;
        } else if (mode == N_PUT && widths[code] == 4) { /* LONG_BINPUT */
            if (arg > limit) return -1;
            if (arg > top) top = arg;
        } else if (code == STOP) {
            const int64_t length = next - start;
            if (top > length) return -1;
            cost += 8 * top;
            int64_t budget = memory_ratio * length;
            if (budget < min_memory) budget = min_memory;
            return cost > budget ? -1 : next;
        }
        pos = next;
    }
    return -1;  /* no STOP: truncated */
}

int64_t mscope_scan_pickle(const uint8_t *data, int64_t len, int64_t start, const int8_t *kinds,
                           const int8_t *widths, const int32_t *costs, int64_t memory_ratio,
                           int64_t min_memory, const int8_t *modes, const int8_t *npops,
                           const int8_t *npushes, int64_t max_nesting, const int8_t *hashy,
                           const int8_t *key_role, int64_t max_hashed) {
    vec depths = {0}, memo = {0};
    int64_t end = scan(data, len, start, kinds, widths, costs, memory_ratio, min_memory, modes,
                       npops, npushes, max_nesting, hashy, key_role, max_hashed, &depths, &memo);
    free(depths.v);
    free(memo.v);
    return end;
}
