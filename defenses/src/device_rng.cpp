// Gaussian noise drawn on a tensor's own device by libtorch's generator for that device type
// (CUDA: Philox, counter-based), from a PRIVATE generator: a clone of the device's default
// generator, reseeded with the caller's seed before the draw. The default generator (the
// user's random stream, which training reseeds and draws from) is only read under its lock to
// make the clone; it is never advanced, reseeded or restored, so no other thread's draws can
// race with the guard's, and the noise depends on the seed alone.
// Every function catches the C++ exception and hands its message back in *error (free it with
// gg_def_free_error). Tensors cross as at::Tensor*, as tch's Tensor wraps.
#include <ATen/ATen.h>
#include <ATen/Context.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <mutex>

extern "C" {
void gg_def_free_error(char *error) { free(error); }

// N(0, std^2) samples with the shape and device of `like`, in f64 when `double_kind` is
// nonzero and f32 otherwise, from a private generator of like's device seeded with `seed`.
void *gg_def_normal(void *like, uint64_t seed, double std, int double_kind, char **error) {
  try {
    const at::Tensor &t = *static_cast<at::Tensor *>(like);
    at::Generator gen;
    {
      at::Generator def = at::globalContext().defaultGenerator(t.device());
      std::lock_guard<std::mutex> lock(def.mutex());
      gen = def.clone();
    }
    // Reseeding resets the whole state (CUDA: seed and Philox offset 0; CPU: the engine and
    // the cached normal sample), so nothing of the default generator's stream is left.
    gen.set_current_seed(seed);
    auto out = at::empty(t.sizes(), t.options().dtype(double_kind ? at::kDouble : at::kFloat));
    out.normal_(0.0, std, gen);
    return new at::Tensor(std::move(out));
  } catch (const std::exception &e) {
    *error = strdup(e.what());
  }
  return nullptr;
}
}
