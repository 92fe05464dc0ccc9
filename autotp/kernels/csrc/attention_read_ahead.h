// Decode attention's software read-ahead of the KV cache (attention_tiles.h includes it, in the
// same region: the instruction set's pragma and namespace; weight_prefetch() from kernel_table.h).
#pragma once

// Software read-ahead over what one call streams, in the order it reads it: the keys' live rows,
// the values' live rows, then the next call's keys (the caller's next (batch row, KV head), or
// none). The hardware's L2 streamer stops at every 4 KiB page and starts again only after a few
// misses, and each stream here is short (a head's rows: 36-72 KB for a 1 B model's cache at 288
// positions), so each page and each stream began with misses the stream waited for.
// fetch_to(n) prefetches every line of the first n bytes of that concatenation not yet asked for.
struct ReadAhead {
  const char* base[3];
  int ranges;
  int64_t size;  // bytes of each range
  int64_t done = 0;  // bytes asked for so far
  int range = 0;
  const char* at;
  const char* range_end;

  ReadAhead(const uint16_t* k, const uint16_t* v, const uint16_t* next_k, int64_t bytes)
      : base{reinterpret_cast<const char*>(k), reinterpret_cast<const char*>(v), reinterpret_cast<const char*>(next_k)},
        ranges(next_k ? 3 : 2), size(bytes), at(base[0]), range_end(base[0] + bytes) {}

  void fetch_to(int64_t n) {
    for (; done < n && range < ranges; done += 64) {
      __builtin_prefetch(at, 0, 3);
      at += 64;
      if (at >= range_end && ++range < ranges) {
        at = base[range];
        range_end = at + size;
        done = range * size - 64;  // (a range's last line may run past its end: the next starts on its own)
      }
    }
  }
};

// How far ahead ReadAhead asks, where the process prefetches its weights (weight_prefetch(),
// kernel_table.h: on Intel, off on AMD, whose L2 prefetcher crosses pages). On the Xeon with AMX,
// one thread, tools/bench_attention.py's caches from memory (4 beams x 288 positions, 16 layers),
// read-ahead on / off interleaved in one process: GPT-J-1B's 75 MB 0.93-0.97x, Llama-1B's 9.4 MB
// 0.91-0.96x the time at 2 KB (1 KB: 0.96-0.97x, 4 KB: 0.97x).
inline int64_t attention_read_ahead() { return weight_prefetch() ? 2048 : 0; }
