// What the guard needs of libtorch that tch does not expose.
// - The default random generators' state: the guard's own passes (the probes' forward, the
//   per-sample passes) run the user's model, whose dropout draws from the default generator of
//   the model's device; the state is saved before the passes and put back after, so that
//   training draws what it would have drawn without the guard.
// - A parameter's gradient slot: the step driver's one backward pass (with create_graph, for
//   M1) returns the gradients instead of accumulating them; they are set as `.grad` here.
// - The last operation of a loss, for M6's per-sample terms: the node that reduces the batch's
//   per-sample values to the scalar loss (a mean, a sum, a fused loss such as nll_loss), the
//   gradient of the loss at that node's one differentiable input T (dL/dT), and backward
//   passes from that input with a gradient of our choosing (sample i's rows of dL/dT, times n:
//   the gradient of sample i's own term over the whole batch's graph). tch runs backward only
//   from tensors; T is not one the caller holds, so the graph's edge is reached here.
// Every function catches the C++ exception and hands its message back in *error (free it with
// gg_ext_free_error). Tensors cross as torch::Tensor*, as tch's Tensor wraps.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <torch/csrc/autograd/engine.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/variable.h>

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

using torch::autograd::Edge;
using torch::autograd::edge_list;
using torch::autograd::variable_list;

// The loss's last node.
std::shared_ptr<torch::autograd::Node> head_node(const at::Tensor &loss) {
  if (!loss.defined()) throw std::runtime_error("the loss is undefined");
  auto node = loss.grad_fn();
  if (!node) throw std::runtime_error("the loss has no autograd graph (nothing it depends on requires grad)");
  return node;
}

// The valid (differentiable) input edges of a node.
edge_list valid_edges(const std::shared_ptr<torch::autograd::Node> &node) {
  edge_list out;
  for (const auto &e : node->next_edges()) {
    if (e.is_valid()) out.push_back(e);
  }
  return out;
}

// The head's one differentiable input; throws when there is not exactly one.
Edge head_edge(const at::Tensor &loss) {
  auto edges = valid_edges(head_node(loss));
  if (edges.size() != 1) throw std::runtime_error("the loss's last operation does not have exactly one differentiable input");
  return edges[0];
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

// The name of the loss's last node (strdup'd into *name) and its count of differentiable
// inputs (*inputs), and the shape of the first of them: up to 8 sizes in sizes, their count in
// *dims (-1 when the node does not record it).
void gg_loss_head(void *loss, char **name, int *inputs, int64_t *sizes, int *dims, char **error) {
  try {
    auto node = head_node(*static_cast<at::Tensor *>(loss));
    auto edges = valid_edges(node);
    *inputs = static_cast<int>(edges.size());
    *dims = -1;
    if (!edges.empty()) {
      const auto &meta = edges[0].function->input_metadata(edges[0].input_nr);
      if (!meta.is_nested_tensor() && !meta.is_cpp_nested_tensor()) {
        auto shape = meta.shape_as_dim_vector();
        if (shape.size() <= 8) {
          *dims = static_cast<int>(shape.size());
          for (size_t k = 0; k < shape.size(); ++k) sizes[k] = shape[k].expect_int();
        }
      }
    }
    *name = strdup(node->name().c_str());
  } catch (const std::exception &e) {
    *error = strdup(e.what());
  }
}

// dL/dT for T the head's one differentiable input, the graph kept (a heap tensor).
void *gg_loss_head_grad(void *loss, char **error) {
  try {
    const auto &l = *static_cast<at::Tensor *>(loss);
    Edge head = head_edge(l);
    edge_list roots{torch::autograd::impl::gradient_edge(l)};
    variable_list seeds{at::ones_like(l)};
    auto out = torch::autograd::Engine::get_default_engine().execute(roots, seeds, true, false, false, {head});
    if (out.size() != 1 || !out[0].defined()) throw std::runtime_error("no gradient reached the loss's last operation's input");
    return new at::Tensor(out[0]);
  } catch (const std::exception &e) {
    *error = strdup(e.what());
  }
  return nullptr;
}

// Backward from the head's input T with gradient `grad` (shaped like T), the graph kept: the
// gradient of <grad, T> with respect to each of the `count` tensors in `params`, written to
// out[k] as heap tensors (undefined where the pass does not reach a tensor, or where it does
// not require grad). As torch::autograd::grad builds its outputs.
void gg_loss_head_backward(void *loss, void *grad, void **params, int count, void **out, char **error) {
  try {
    const auto &l = *static_cast<at::Tensor *>(loss);
    Edge head = head_edge(l);
    edge_list outputs;
    outputs.reserve(count);
    for (int k = 0; k < count; ++k) {
      const auto &p = *static_cast<at::Tensor *>(params[k]);
      std::shared_ptr<torch::autograd::Node> fn;
      if (p.defined() && p.requires_grad()) {
        fn = p.grad_fn();
        if (!fn) fn = torch::autograd::impl::try_get_grad_accumulator(p);
      }
      if (fn) {
        outputs.emplace_back(fn, p.output_nr());
      } else {
        outputs.emplace_back(std::make_shared<torch::autograd::Identity>(), 0);
      }
    }
    variable_list seeds{*static_cast<at::Tensor *>(grad)};
    auto got = torch::autograd::Engine::get_default_engine().execute({head}, seeds, true, false, false, outputs);
    if (got.size() != static_cast<size_t>(count)) throw std::runtime_error("backward returned the wrong number of gradients");
    for (int k = 0; k < count; ++k) out[k] = new at::Tensor(got[k]);
  } catch (const std::exception &e) {
    *error = strdup(e.what());
  }
}
}
