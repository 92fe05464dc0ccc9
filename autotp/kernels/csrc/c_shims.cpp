// C entry points of the ops a compiled decoding step calls (autotp.sharding.decode): inductor's
// C++ wrapper calls an op named in its custom_ops_to_c_shims directly, by the name
// aoti_torch_cpu_<op> and with its C shim arguments (a tensor as a handle, an optional one as a
// pointer to a handle or null, an optional dtype as a pointer to an int32, a string as a C
// string), where otherwise each call packs its arguments into a stack of IValues and goes
// through the dispatcher and torch's autograd fallback. Declarations: autotp/kernels/shims.py.
#include <ATen/core/Tensor.h>
#include <torch/csrc/inductor/aoti_torch/utils.h>

#include <cstdint>
#include <optional>

#include "ops.h"
#include "shm_comm.h"

namespace {
inline at::Tensor& shim_tensor(AtenTensorHandle h) { return *torch::aot_inductor::tensor_handle_to_tensor_pointer(h); }
inline std::optional<at::Tensor> shim_optional(AtenTensorHandle* h) {
  return h ? std::optional<at::Tensor>(shim_tensor(*h)) : std::nullopt;
}
inline std::optional<at::ScalarType> shim_dtype(int32_t* d) {
  return d ? std::optional<at::ScalarType>(static_cast<at::ScalarType>(*d)) : std::nullopt;
}
}  // namespace

extern "C" {
AOTITorchError aoti_torch_cpu_linear_bf16(AtenTensorHandle x, AtenTensorHandle packed, AtenTensorHandle* bias,
                                          int64_t out_features, int32_t* out_dtype, const char* isa,
                                          AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = torch::aot_inductor::new_tensor_handle(autotp::linear_bf16(
        shim_tensor(x), shim_tensor(packed), shim_optional(bias), out_features, shim_dtype(out_dtype), isa));
  });
}

AOTITorchError aoti_torch_cpu_linear_int8(AtenTensorHandle x, AtenTensorHandle qpacked, AtenTensorHandle spacked,
                                          AtenTensorHandle* bias, int64_t out_features, int64_t group_size,
                                          int64_t group_offset, int32_t* out_dtype, const char* isa,
                                          int64_t activation_bits, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = torch::aot_inductor::new_tensor_handle(autotp::linear_int8(
        shim_tensor(x), shim_tensor(qpacked), shim_tensor(spacked), shim_optional(bias), out_features, group_size,
        group_offset, shim_dtype(out_dtype), isa, activation_bits));
  });
}

AOTITorchError aoti_torch_cpu_linear_int4(AtenTensorHandle x, AtenTensorHandle qpacked, AtenTensorHandle spacked,
                                          AtenTensorHandle* zpacked, AtenTensorHandle* bias, int64_t out_features,
                                          int64_t group_size, int64_t group_offset, int32_t* out_dtype,
                                          const char* isa, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = torch::aot_inductor::new_tensor_handle(autotp::linear_int4(
        shim_tensor(x), shim_tensor(qpacked), shim_tensor(spacked), shim_optional(zpacked), shim_optional(bias),
        out_features, group_size, group_offset, shim_dtype(out_dtype), isa));
  });
}

AOTITorchError aoti_torch_cpu_shm_all_reduce(AtenTensorHandle tensor, int64_t comm, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = torch::aot_inductor::new_tensor_handle(autotp::shm_all_reduce(shim_tensor(tensor), comm));
  });
}

AOTITorchError aoti_torch_cpu_shm_all_gather_last_dim(AtenTensorHandle tensor, int64_t comm, const int64_t* sizes,
                                                      int64_t sizes_len, AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = torch::aot_inductor::new_tensor_handle(
        autotp::shm_all_gather_last_dim(shim_tensor(tensor), comm, at::IntArrayRef(sizes, sizes_len)));
  });
}

AOTITorchError aoti_torch_cpu_decode_attention(AtenTensorHandle q, AtenTensorHandle key, AtenTensorHandle value,
                                               AtenTensorHandle* bias, double scale, const char* isa,
                                               AtenTensorHandle* ret0) {
  AOTI_TORCH_CONVERT_EXCEPTION_TO_ERROR_CODE({
    *ret0 = torch::aot_inductor::new_tensor_handle(autotp::decode_attention(
        shim_tensor(q), shim_tensor(key), shim_tensor(value), shim_optional(bias), scale, isa));
  });
}
}  // extern "C"
