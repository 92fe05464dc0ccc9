// The ops that other files of the extension call as C++ functions (c_shims.cpp: their C entry
// points for a compiled decoding step). Definitions: ops.cpp (the GEMMs), decode_ops.cpp (decode
// attention); the shared-memory collectives: shm_comm.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>

namespace autotp {

at::Tensor linear_bf16(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                       int64_t N, std::optional<at::ScalarType> out_dtype, const std::string& isa);
at::Tensor linear_int8(const at::Tensor& x, const at::Tensor& qpacked, const at::Tensor& spacked,
                       const std::optional<at::Tensor>& bias, int64_t N, int64_t group_size, int64_t group_offset,
                       std::optional<at::ScalarType> out_dtype, const std::string& isa, int64_t activation_bits);
at::Tensor linear_int4(const at::Tensor& x, const at::Tensor& qpacked, const at::Tensor& spacked,
                       const std::optional<at::Tensor>& zpacked, const std::optional<at::Tensor>& bias, int64_t N,
                       int64_t group_size, int64_t group_offset, std::optional<at::ScalarType> out_dtype,
                       const std::string& isa);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& key, const at::Tensor& value,
                            const std::optional<at::Tensor>& bias, double scale, const std::string& isa);

}  // namespace autotp
