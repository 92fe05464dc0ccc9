// AVX512-BF16's decode attention type (attention_tiles.h): the AVX-512 vector type plus the
// bf16 pair products of score_block_across. Included after avx512_vector.h inside a region that
// targets AVX512-BF16 (isa_avx512_bf16.cpp, isa_amx_attention.cpp), in its anonymous namespace.

// Decode attention (attention_tiles.h) as the AVX-512 table computes it, but where a KV head
// serves several query heads and the query is exactly bf16 (a bf16 model's), the scores are
// vdpbf16ps products of the transposed key pairs and the query's pair: half the product
// instructions of the FMAs, no widening (score_block_across)
struct Avx512Bf16Attention : Avx512 {
  static F dot_pairs(F acc, I keys, uint32_t pair) {
    return _mm512_dpbf16_ps(acc, reinterpret_cast<__m512bh>(keys), reinterpret_cast<__m512bh>(_mm512_set1_epi32(
                                                                          static_cast<int>(pair))));
  }
};
