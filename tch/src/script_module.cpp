// A TorchScript module for gradguard: what tch's CModule offers (load, forward, train/eval,
// named parameters) and what it does not: the module's named buffers (batch norm's running
// statistics), which the guard must restore after its own passes. Every function catches the
// C++ exception and hands its message back in *error (free it with gg_script_free_error).
// Tensors cross as torch::Tensor*, the representation tch's Tensor wraps.
#include <torch/script.h>

#include <cstdlib>
#include <cstring>
#include <exception>

namespace {
using Module = torch::jit::script::Module;

void set_error(char **error, const char *message) {
  *error = strdup(message);
}

// The device numbering of tch (Device::c_int): -1 CPU, -2 MPS, -3 Vulkan, i >= 0 CUDA i.
torch::Device device_of(int d) {
  if (d == -3) return torch::Device(torch::kVulkan);
  if (d == -2) return torch::Device(torch::kMPS);
  if (d < 0) return torch::Device(torch::kCPU);
  return torch::Device(torch::kCUDA, static_cast<c10::DeviceIndex>(d));
}
}  // namespace

extern "C" {
typedef void (*gg_named_tensor)(void *data, const char *name, void *tensor);

void *gg_script_load(const char *path, int device, char **error) {
  try {
    return new Module(torch::jit::load(path, device_of(device)));
  } catch (const std::exception &e) {
    set_error(error, e.what());
  }
  return nullptr;
}

void gg_script_free(void *module) { delete static_cast<Module *>(module); }

void gg_script_free_error(char *error) { free(error); }

// The module's parameters (buffers = false) or buffers (true), recursively, with PyTorch's
// dotted names, in module order; each tensor shares storage with the module's.
void gg_script_named_tensors(void *module, bool buffers, void *data, gg_named_tensor f, char **error) {
  try {
    auto *m = static_cast<Module *>(module);
    if (buffers) {
      for (const auto &b : m->named_buffers()) f(data, b.name.c_str(), new torch::Tensor(b.value));
    } else {
      for (const auto &p : m->named_parameters()) f(data, p.name.c_str(), new torch::Tensor(p.value));
    }
  } catch (const std::exception &e) {
    set_error(error, e.what());
  }
}

// The module's method `name` (forward, embed, forward_embedded) on one tensor, which must
// return one tensor.
void *gg_script_call(void *module, const char *name, const void *input, char **error) {
  try {
    std::vector<torch::jit::IValue> inputs{*static_cast<const torch::Tensor *>(input)};
    torch::jit::IValue output = static_cast<Module *>(module)->get_method(name)(std::move(inputs));
    if (!output.isTensor()) {
      set_error(error, (std::string(name) + " did not return a tensor").c_str());
      return nullptr;
    }
    return new torch::Tensor(output.toTensor());
  } catch (const std::exception &e) {
    set_error(error, e.what());
  }
  return nullptr;
}

// Whether the module defines method `name`.
bool gg_script_has_method(void *module, const char *name) {
  return static_cast<Module *>(module)->find_method(name).has_value();
}

// torch.jit.save's format, loadable by torch.jit.load.
void gg_script_save(void *module, const char *path, char **error) {
  try {
    static_cast<Module *>(module)->save(path);
  } catch (const std::exception &e) {
    set_error(error, e.what());
  }
}

void gg_script_train(void *module, bool on, char **error) {
  try {
    static_cast<Module *>(module)->train(on);
  } catch (const std::exception &e) {
    set_error(error, e.what());
  }
}
}
