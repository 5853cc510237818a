// What the guard needs of libtorch that tch does not expose.
// - The default random generators' state: the guard's own passes (the probes' forward, the
//   per-sample passes) run the user's model, whose dropout draws from the default generator of
//   the model's device; the state is saved before the passes and put back after, so that
//   training draws what it would have drawn without the guard.
// - A parameter's gradient slot: the step driver's one backward pass (with create_graph, for
//   M1) returns the gradients instead of accumulating them; they are set as `.grad` here.
// Every function catches the C++ exception and hands its message back in *error (free it with
// gg_ext_free_error). Tensors cross as torch::Tensor*, as tch's Tensor wraps.
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>

namespace {
// The device numbering of tch (Device::c_int): -1 CPU, i >= 0 CUDA i; others are refused.
const at::Generator &generator_of(int d) {
  if (d == -1) return at::detail::getDefaultCPUGenerator();
  if (d >= 0) return at::globalContext().defaultGenerator(c10::Device(c10::kCUDA, static_cast<c10::DeviceIndex>(d)));
  throw std::runtime_error("no default generator state is kept for this device");
}
}  // namespace

extern "C" {
void gg_ext_free_error(char *error) { free(error); }

// A copy of the generator's state (a byte tensor on the host).
void *gg_rng_get_state(int device, char **error) {
  try {
    at::Generator gen = generator_of(device);  // a handle: the copy shares the generator
    std::lock_guard<std::mutex> lock(gen.mutex());
    return new at::Tensor(gen.get_state());
  } catch (const std::exception &e) {
    *error = strdup(e.what());
  }
  return nullptr;
}

// Puts a state taken by gg_rng_get_state back; the tensor stays the caller's.
void gg_rng_set_state(int device, void *state, char **error) {
  try {
    at::Generator gen = generator_of(device);
    std::lock_guard<std::mutex> lock(gen.mutex());
    gen.set_state(*static_cast<at::Tensor *>(state));
  } catch (const std::exception &e) {
    *error = strdup(e.what());
  }
}

// param.grad = grad (the tensor itself, not a copy).
void gg_set_grad(void *param, void *grad, char **error) {
  try {
    static_cast<at::Tensor *>(param)->mutable_grad() = *static_cast<at::Tensor *>(grad);
  } catch (const std::exception &e) {
    *error = strdup(e.what());
  }
}
}
