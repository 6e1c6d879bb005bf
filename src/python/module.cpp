// grape._C: the binding of grape's public API for Python (docs/python.md). Thin on purpose: it converts
// arguments and calls the library; the checks that speak in Python's terms (layouts, torch dtypes) and the
// torch.nn.Module wrappers live in python/grape/. Every call into the library runs without the GIL, on the
// calling thread, so torch.set_num_threads governs LibTorch's and the fused kernels' OpenMP threads alike.
// The one translation unit of the package that includes torch/extension.h (a heavy header).
#include <fmt/format.h>
#include <omp.h>
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "grape/attention.hpp"
#include "grape/data.hpp"
#include "grape/model.hpp"
#include "grape/pe.hpp"
#include "grape/train.hpp"

namespace py = pybind11;

namespace grape {
namespace {

using Settings = std::map<std::string, std::string>;
using NamedTensors = std::vector<std::pair<std::string, torch::Tensor>>;

// The streaming state of one attention layer over one batch of sequences: the encoding's running state,
// the keys (and values) seen so far, and KV-shift's last raw projections. Bound to the encoding that
// started it, so a cache is never fed to another layer by mistake.
struct AttentionCache {
  EncodingPtr encoding;  // null while nothing was attended
  int64_t batch = 0;
  PeState pe;
  KeyCache keys;
  KVShiftState shift;
};

// Starts `cache` for `enc` and a batch of B rows, or checks that it belongs to them.
void bind_cache(AttentionCache& cache, const EncodingPtr& enc, int64_t B) {
  if (!cache.encoding) {
    cache.encoding = enc;
    cache.batch = B;
    cache.pe = enc->initial_state(B, 0);
    return;
  }
  if (cache.encoding != enc)
    throw std::invalid_argument(
        fmt::format("grape.attention: this cache was started with another {} encoding "
                    "object; use one AttentionCache per layer",
                    cache.encoding->name()));
  if (cache.batch != B)
    throw std::invalid_argument(
        fmt::format("grape.attention: this cache holds {} sequences, the input has {}", cache.batch, B));
}

// QK-norm on the encoded q~, k~ (qk_norm=after_rotation): the RMSNorm gains [D] of q and k and its eps.
struct EncodedNorm {
  torch::Tensor q_gain, k_gain;
  double eps = 1e-5;
};

// y [B,T,H,D] = causal attention of one chunk of q, k, v [B,T,H,D]: a fresh pass from position 0, or the
// continuation of `cache`. `attend` picks the fused kernels (fp32, an encoding they compute) or the
// reference. With `norm`, q~ and k~ are RMS-normalised after encode, before they are cached.
torch::Tensor attention(const EncodingPtr& enc, const torch::Tensor& q, const torch::Tensor& k,
                        const torch::Tensor& v, const std::optional<torch::Tensor>& x, AttentionCache* cache,
                        const std::string& impl, const std::optional<EncodedNorm>& norm) {
  const auto mode = parse_attention_impl(impl);
  if (norm) check_qk_norm(QKNorm::after_rotation, *enc);
  py::gil_scoped_release no_gil;
  const TokenContext ctx(x ? *x : torch::Tensor());
  auto encode = [&](PeState& state) {
    auto tokens = enc->encode(q, k, ctx, state);
    if (norm) {
      tokens.q = rms_norm(tokens.q, norm->q_gain, norm->eps);
      tokens.k = rms_norm(tokens.k, norm->k_gain, norm->eps);
    }
    return tokens;
  };
  if (cache == nullptr) {
    PeState state = enc->initial_state(q.size(0), 0);
    auto tokens = encode(state);
    return attend(*enc, tokens, KeyCache::from(tokens, v), mode).y;
  }
  bind_cache(*cache, enc, q.size(0));
  PeState state = cache->pe;  // advanced only once the chunk is encoded: a refused chunk leaves the cache
  auto tokens = encode(state);
  cache->pe = std::move(state);
  cache->keys.append(tokens, v);
  return attend(*enc, tokens, cache->keys, mode).y;
}

// The parameters, buffers and submodules a module registered itself (not recursive): python/grape mirrors
// the tree as torch.nn.Modules whose Parameters are these very tensors.
NamedTensors own_parameters(torch::nn::Module& m) {
  NamedTensors out;
  for (const auto& p : m.named_parameters(/*recurse=*/false)) out.emplace_back(p.key(), p.value());
  return out;
}
NamedTensors own_buffers(torch::nn::Module& m) {
  NamedTensors out;
  for (const auto& b : m.named_buffers(/*recurse=*/false)) out.emplace_back(b.key(), b.value());
  return out;
}
std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> children(torch::nn::Module& m) {
  std::vector<std::pair<std::string, std::shared_ptr<torch::nn::Module>>> out;
  for (const auto& c : m.named_children()) out.emplace_back(c.key(), c.value());
  return out;
}

py::dict properties_dict(const Properties& p) {
  py::dict d;
  d["embeds"] = p.embeds;
  d["rotates"] = p.rotates;
  d["scales"] = p.scales;
  d["has_bias"] = p.has_bias;
  d["contextual"] = p.contextual;
  d["relative"] = p.relative;
  d["phase_relative"] = p.phase_relative;
  d["signed_bias"] = p.signed_bias;
  d["reads_stream"] = p.reads_stream;
  d["updates_stream"] = p.updates_stream;
  d["qk_norm_after_encode"] = p.qk_norm_after_encode;
  d["kernel_bias"] = std::string(to_string(p.kernel_bias));
  return d;
}

py::list encoding_list() {
  py::list out;
  for (const auto& info : encodings()) {
    py::dict e, options;
    e["name"] = info.name;
    e["family"] = info.family;
    e["summary"] = info.summary;
    for (const auto& o : info.options) options[py::str(o.key)] = py::make_tuple(o.default_value, o.help);
    e["options"] = options;
    e["parameters"] = info.parameters;
    out.append(e);
  }
  return out;
}

// A config from key=value settings as `--set` takes them; "preset" first, since it sets every field. Not
// validated here: the Transformer validates it, and validating builds the encoding, which would draw from
// torch's generator and shift the initial weights away from those of `grape train --seed`.
ModelConfig model_config(const Settings& settings) {
  ModelConfig c;
  if (auto p = settings.find("preset"); p != settings.end()) c.set("preset", p->second, "grape model config");
  for (const auto& [key, value] : settings)
    if (key != "preset") c.set(key, value, "grape model config");
  return c;
}

train::TrainConfig train_config(const Settings& settings) {
  train::TrainConfig c;
  for (const auto& [key, value] : settings) c.set(key, value, "grape train config");
  c.validate();
  return c;
}

}  // namespace
}  // namespace grape

PYBIND11_MODULE(_C, m) {
  using namespace grape;
  m.doc() = "grape's C++ library (use the package grape, not this module)";
  // LibTorch's errors carry a C++ backtrace that says nothing to a Python user.
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });

  py::class_<torch::nn::Module, std::shared_ptr<torch::nn::Module>>(m, "Module", py::module_local())
      .def("own_parameters", &own_parameters)
      .def("own_buffers", &own_buffers)
      .def("children", &children)
      .def("train", [](torch::nn::Module& self, bool on) { self.train(on); });

  py::class_<Encoding, torch::nn::Module, EncodingPtr>(m, "Encoding", py::module_local())
      .def_property_readonly("name", &Encoding::name)
      .def_property_readonly("heads", [](const Encoding& e) { return e.shape().heads; })
      .def_property_readonly("head_dim", [](const Encoding& e) { return e.shape().head_dim; })
      .def_property_readonly("model_dim", [](const Encoding& e) { return e.shape().model_dim; })
      .def_property_readonly("properties", [](const Encoding& e) { return properties_dict(e.properties()); })
      .def_property_readonly("fused", [](const Encoding& e) { return fused_supported(e); })
      .def("embed", [](const Encoding& e, const torch::Tensor& h, int64_t offset) {
        py::gil_scoped_release no_gil;
        return e.embed(h, offset);
      });
  m.def("encodings", &encoding_list);
  m.def(
      "make_encoding",
      [](const std::string& name, int64_t heads, int64_t head_dim, int64_t model_dim,
         const Settings& options) {
        return make_encoding(name, HeadShape{heads, head_dim, model_dim}, PeOptions(options));
      },
      py::arg("name"), py::arg("heads"), py::arg("head_dim"), py::arg("model_dim"), py::arg("options"));

  py::class_<AttentionCache, std::shared_ptr<AttentionCache>>(m, "AttentionCache", py::module_local())
      .def(py::init<>())
      .def_property_readonly("length", [](const AttentionCache& c) { return c.keys.length; })
      .def_property_readonly("batch", [](const AttentionCache& c) { return c.batch; })
      .def_property_readonly("encoding", [](const AttentionCache& c) { return c.encoding; });
  // The pieces of the definition logits = q~ . k~ / sqrt(D) + bias of a pass from position 0: the q~ and
  // k~ [B,T,H,D] the dot product uses and the bias [B,H,T,T] (None without one), for tests that compose the
  // attention themselves.
  m.def(
      "encoded",
      [](const EncodingPtr& enc, const torch::Tensor& q, const torch::Tensor& k,
         const std::optional<torch::Tensor>& x) {
        py::gil_scoped_release no_gil;
        PeState state = enc->initial_state(q.size(0), 0);
        auto tokens = enc->encode(q, k, TokenContext(x ? *x : torch::Tensor()), state);
        auto keys = KeyCache::from(tokens);
        auto [qa, ka] = enc->attention_qk(tokens, keys);
        return std::make_tuple(qa, ka, enc->bias(tokens, keys));
      },
      py::arg("encoding"), py::arg("q"), py::arg("k"), py::arg("x").none(true));
  py::class_<EncodedNorm>(m, "EncodedNorm", py::module_local())
      .def(py::init([](const torch::Tensor& q_gain, const torch::Tensor& k_gain, double eps) {
             return EncodedNorm{q_gain, k_gain, eps};
           }),
           py::arg("q_gain"), py::arg("k_gain"), py::arg("eps"));
  m.def("attention", &attention, py::arg("encoding"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("x"),
        py::arg("cache").none(true), py::arg("impl"), py::arg("norm").none(true) = py::none());

  py::class_<KVShiftImpl, torch::nn::Module, std::shared_ptr<KVShiftImpl>>(m, "KVShift", py::module_local())
      .def(py::init([](int64_t heads, int64_t head_dim, int64_t model_dim) {
        return std::make_shared<KVShiftImpl>(HeadShape{heads, head_dim, model_dim});
      }))
      .def(
          "forward",
          [](KVShiftImpl& self, const torch::Tensor& k, const torch::Tensor& v, const torch::Tensor& x,
             AttentionCache* cache) {
            py::gil_scoped_release no_gil;
            KVShiftState fresh;
            return self.forward(k, v, x, cache ? cache->shift : fresh);
          },
          py::arg("k"), py::arg("v"), py::arg("x"), py::arg("cache").none(true));

  py::class_<data::Tokenizer, std::shared_ptr<data::Tokenizer>>(m, "Tokenizer", py::module_local())
      .def_property_readonly("kind", &data::Tokenizer::kind)
      .def_property_readonly("vocab_size", &data::Tokenizer::vocab_size)
      .def_property_readonly("eot", &data::Tokenizer::eot)
      .def("encode", [](const data::Tokenizer& t, const std::string& s) { return t.encode(s); })
      .def("decode", [](const data::Tokenizer& t, const std::vector<int32_t>& ids) {
        const auto text = t.decode(ids);  // bytes of a byte-level model need not be whole UTF-8 characters
        return py::reinterpret_steal<py::str>(
            PyUnicode_DecodeUTF8(text.data(), py::ssize_t(text.size()), "replace"));
      });
  m.def("make_tokenizer",
        [](const std::string& spec) { return std::shared_ptr<data::Tokenizer>(data::make_tokenizer(spec)); });

  py::class_<TransformerImpl, torch::nn::Module, std::shared_ptr<TransformerImpl>>(m, "Transformer",
                                                                                   py::module_local())
      .def(py::init(
          [](const Settings& settings) { return std::make_shared<TransformerImpl>(model_config(settings)); }))
      .def_property_readonly("config_json", [](const TransformerImpl& t) { return t.config().to_json(); })
      .def("num_parameters", &TransformerImpl::num_parameters)
      .def("forward",
           [](TransformerImpl& t, const torch::Tensor& tokens) {
             py::gil_scoped_release no_gil;
             return t.forward(tokens);
           })
      .def("loss", [](TransformerImpl& t, const torch::Tensor& tokens, const torch::Tensor& targets) {
        py::gil_scoped_release no_gil;
        return t.loss(tokens, targets);
      });
  m.def(
      "generate",
      [](const std::shared_ptr<TransformerImpl>& model, const std::vector<std::vector<int32_t>>& prompts,
         double temperature, int64_t top_k, double top_p, int64_t max_tokens, uint64_t seed, int64_t eot) {
        train::SamplingOptions o;
        o.temperature = temperature;
        o.top_k = top_k;
        o.top_p = top_p;
        o.max_tokens = max_tokens;
        o.seed = seed;
        o.eot = eot;
        py::gil_scoped_release no_gil;
        Transformer holder(model);
        return train::generate(holder, prompts, o);
      },
      py::arg("model"), py::arg("prompts"), py::arg("temperature"), py::arg("top_k"), py::arg("top_p"),
      py::arg("max_tokens"), py::arg("seed"), py::arg("eot"));
  m.def(
      "load_run",
      [](const std::string& dir, const std::string& checkpoint) {
        py::gil_scoped_release no_gil;
        auto run = train::read_run(dir);
        auto model = train::load_model(run, checkpoint);
        return std::make_pair(model.ptr(), std::shared_ptr<data::Tokenizer>(train::run_tokenizer(run)));
      },
      py::arg("dir"), py::arg("checkpoint"));

  // The training data and schedule of `grape train`, so that a PyTorch loop can reproduce a run.
  py::class_<data::DataSource, std::shared_ptr<data::DataSource>>(m, "DataSource", py::module_local())
      .def_property_readonly("description", &data::DataSource::describe)
      .def(
          "train_batch",
          [](const data::DataSource& d, int64_t batch, int64_t T, uint64_t seed, int64_t step,
             int64_t micro) {
            py::gil_scoped_release no_gil;
            auto rng = train::batch_rng(seed, step, micro);
            auto b = d.train_batch(batch, T, rng);
            return std::make_pair(b.x, b.y);
          },
          py::arg("batch"), py::arg("T"), py::arg("seed"), py::arg("step"), py::arg("micro") = 0);
  m.def(
      "open_data",
      [](const std::string& spec, const data::Tokenizer& tok, double val_fraction) {
        data::DataOptions o;
        o.val_fraction = val_fraction;
        py::gil_scoped_release no_gil;
        return std::shared_ptr<data::DataSource>(data::open_data(spec, tok, o));
      },
      py::arg("spec"), py::arg("tokenizer"), py::arg("val_fraction"));
  m.def("lr_at",
        [](const Settings& settings, int64_t step) { return train::lr_at(train_config(settings), step); });

  // The OpenMP threads a parallel region started here gets: what torch.set_num_threads set for this thread.
  m.def("kernel_threads", [] { return omp_get_max_threads(); });
}
