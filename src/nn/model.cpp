// The decoder language model (docs/training.md, "The model"): tied embedding, pre-RMSNorm blocks with
// QK-normalised multi-head attention and a SwiGLU MLP, final RMSNorm, LM head = embedding^T.
// forward() and forward_cached() share one block implementation; they differ only in which rows share a
// position-encoding state and a key cache (all rows at once vs one row per sequence).
#include "grape/model.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <unordered_set>

#include "grape/attention.hpp"
#include "kernels/cpu/rmsnorm.hpp"
#include "kernels/cpu/swiglu.hpp"

namespace grape {
namespace {

// Reduced-precision inputs are normalised in fp32; fp32 and fp64 stay as they are.
torch::ScalarType compute_dtype(torch::ScalarType t) {
  return (t == torch::kHalf || t == torch::kBFloat16) ? torch::kFloat32 : t;
}

// tokens (or targets) as [B,T] int64 with every id in [0, vocab).
torch::Tensor check_ids(const torch::Tensor& ids, int64_t vocab, const char* what) {
  if (!ids.defined() || ids.dim() != 2 || ids.size(0) < 1 || ids.size(1) < 1)
    throw std::invalid_argument(fmt::format("model: {} must be a non-empty [B,T] tensor, got {}", what,
                                            ids.defined() ? shape_string(ids) : "none"));
  if (ids.scalar_type() != torch::kInt64 && ids.scalar_type() != torch::kInt32)
    throw std::invalid_argument(
        fmt::format("model: {} must be int64 (or int32), got {}", what, c10::toString(ids.scalar_type())));
  auto t = ids.to(torch::kInt64);
  auto bad = (t < 0) | (t >= vocab);
  if (bad.any().item<bool>())
    throw std::invalid_argument(fmt::format("model: {} contain id {} outside the vocabulary [0, {})", what,
                                            t.masked_select(bad)[0].item<int64_t>(), vocab));
  return t;
}

}  // namespace

namespace {

// The binding of the RMSNorm kernel (src/kernels/cpu/rmsnorm.hpp): fp32, any shape, over the last dim.
struct FusedRMSNorm : torch::autograd::Function<FusedRMSNorm> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& w, double eps) {
    auto xc = x.contiguous(), wc = w.contiguous();
    const int64_t n = xc.size(-1), rows = xc.numel() / std::max<int64_t>(n, 1);
    auto y = torch::empty_like(xc);
    auto rstd = torch::empty({rows}, xc.options());
    kernels::cpu::rmsnorm_forward(xc.data_ptr<float>(), wc.data_ptr<float>(), rows, n, float(eps),
                                  y.data_ptr<float>(), rstd.data_ptr<float>());
    ctx->save_for_backward({xc, wc, rstd});
    return y;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &x = saved[0], &w = saved[1], &rstd = saved[2];
    auto dy = grads[0].contiguous();
    auto dx = torch::empty_like(x), dw = torch::empty_like(w);
    kernels::cpu::rmsnorm_backward(x.data_ptr<float>(), w.data_ptr<float>(), rstd.data_ptr<float>(),
                                   dy.data_ptr<float>(), rstd.numel(), x.size(-1), dx.data_ptr<float>(),
                                   dw.data_ptr<float>());
    return {dx, dw, torch::Tensor()};
  }
};

// The binding of the SwiGLU kernel (src/kernels/cpu/swiglu.hpp): silu(a) * b for fp32 a, b of one shape.
struct FusedSwiGLU : torch::autograd::Function<FusedSwiGLU> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& a,
                               const torch::Tensor& b) {
    auto ac = a.contiguous(), bc = b.contiguous();
    auto out = torch::empty_like(ac);
    kernels::cpu::swiglu_forward(ac.data_ptr<float>(), bc.data_ptr<float>(), ac.numel(),
                                 out.data_ptr<float>());
    ctx->save_for_backward({ac, bc});
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto &a = saved[0], &b = saved[1];
    auto dout = grads[0].contiguous();
    auto da = torch::empty_like(a), db = torch::empty_like(b);
    kernels::cpu::swiglu_backward(a.data_ptr<float>(), b.data_ptr<float>(), dout.data_ptr<float>(), a.numel(),
                                  da.data_ptr<float>(), db.data_ptr<float>());
    return {da, db};
  }
};

// The MLP sublayer with its residual, x + W_out swiglu(W_1 n, W_2 n) with n = RMSNorm(x; g), as one autograd
// node (block=fused, fp32 CPU): the RMSNorm and SwiGLU kernels around four products. The residual rides on
// the products: the last forward product accumulates onto a copy of x (beta = 1), dn = da W_1 + db W_2 is
// one product accumulating onto another, and the norm's backward adds the residual's gradient in its pass.
// The composed sublayer took ~20 LibTorch ops and three element-wise passes (two adds, a sum) more per layer.
struct FusedMLP : torch::autograd::Function<FusedMLP> {
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& g, const torch::Tensor& w1, const torch::Tensor& w2,
                               const torch::Tensor& w_out, double eps) {
    const int64_t C = x.size(-1), M = x.numel() / C;
    const auto xc = x.contiguous();
    auto out = xc.clone();  // the residual, which the last product adds onto
    auto xm = xc.view({M, C}), gc = g.contiguous();
    auto n = torch::empty_like(xm), rstd = torch::empty({M}, xm.options());
    kernels::cpu::rmsnorm_forward(xm.data_ptr<float>(), gc.data_ptr<float>(), M, C, float(eps),
                                  n.data_ptr<float>(), rstd.data_ptr<float>());
    auto a = torch::mm(n, w1.t()), b = torch::mm(n, w2.t());
    auto s = torch::empty_like(a);
    kernels::cpu::swiglu_forward(a.data_ptr<float>(), b.data_ptr<float>(), a.numel(), s.data_ptr<float>());
    out.view({M, C}).addmm_(s, w_out.t());
    ctx->save_for_backward({xm, gc, rstd, n, a, b, s, w1, w2, w_out});
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto v = ctx->get_saved_variables();
    const auto &xm = v[0], &g = v[1], &rstd = v[2], &n = v[3], &a = v[4], &b = v[5], &s = v[6];
    const auto &w1 = v[7], &w2 = v[8], &w_out = v[9];
    const int64_t M = xm.size(0), C = xm.size(1);
    auto dout = grads[0].contiguous().view({M, C});
    auto dw_out = torch::mm(dout.t(), s);
    auto ds = torch::mm(dout, w_out);
    auto da = torch::empty_like(a), db = torch::empty_like(b);
    kernels::cpu::swiglu_backward(a.data_ptr<float>(), b.data_ptr<float>(), ds.data_ptr<float>(), a.numel(),
                                  da.data_ptr<float>(), db.data_ptr<float>());
    auto dw1 = torch::mm(da.t(), n), dw2 = torch::mm(db.t(), n);
    auto dn = torch::mm(da, w1);
    dn.addmm_(db, w2);
    auto dx = torch::empty_like(grads[0], at::MemoryFormat::Contiguous), dg = torch::empty_like(g);
    kernels::cpu::rmsnorm_backward(xm.data_ptr<float>(), g.data_ptr<float>(), rstd.data_ptr<float>(),
                                   dn.data_ptr<float>(), M, C, dx.data_ptr<float>(), dg.data_ptr<float>(),
                                   /*dres=*/dout.data_ptr<float>());
    return {dx, dg, dw1, dw2, dw_out, torch::Tensor()};
  }
};

// q, k, v = x W_q^T, x W_k^T, x W_v^T as one autograd node (block=fused, fp32 CPU). Its backward forms
// dx = dq W_q + dk W_k + dv W_v by products accumulating onto one buffer (beta = 1), where autograd took
// three products, two adds and the ops around each linear.
struct FusedQKV : torch::autograd::Function<FusedQKV> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                                                const torch::Tensor& wq, const torch::Tensor& wk,
                                                const torch::Tensor& wv) {
    const int64_t C = x.size(-1), M = x.numel() / C;
    auto xm = x.contiguous().view({M, C});
    auto sizes = x.sizes().vec();
    torch::autograd::variable_list out;
    for (const auto* w : {&wq, &wk, &wv}) {
      sizes.back() = w->size(0);
      out.push_back(torch::empty(sizes, xm.options()));
      auto rows = out.back().view({M, w->size(0)});
      torch::mm_out(rows, xm, w->t());
    }
    ctx->save_for_backward({xm, wq, wk, wv});
    ctx->saved_data["sizes"] = x.sizes().vec();
    return out;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto v = ctx->get_saved_variables();
    const auto& xm = v[0];
    torch::Tensor dx;
    torch::autograd::variable_list out(4);
    for (size_t i = 0; i < 3; ++i) {
      if (!grads[i].defined()) continue;
      const auto& w = v[1 + i];
      auto dy = grads[i].contiguous().view({xm.size(0), w.size(0)});
      out[1 + i] = torch::mm(dy.t(), xm);
      if (dx.defined())
        dx.addmm_(dy, w);
      else
        dx = torch::mm(dy, w);
    }
    if (dx.defined()) out[0] = dx.view(ctx->saved_data["sizes"].toIntVector());
    return out;
  }
};

// Whether the fused kernels take these tensors: fp32, on the CPU, none empty.
bool fp32_cpu(std::initializer_list<torch::Tensor> ts) {
  return std::all_of(ts.begin(), ts.end(), [](const torch::Tensor& t) {
    return t.scalar_type() == torch::kFloat32 && t.device().is_cpu() && t.numel() > 0;
  });
}

}  // namespace

torch::Tensor swiglu(const torch::Tensor& a, const torch::Tensor& b, bool fused) {
  if (fused && fp32_cpu({a, b}) && a.sizes().equals(b.sizes())) return FusedSwiGLU::apply(a, b);
  return torch::silu(a) * b;
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps_, bool fused_) : eps(eps_), fused(fused_) {
  weight = register_parameter("weight", torch::ones({dim}));
}

torch::Tensor rms_norm(const torch::Tensor& x, const torch::Tensor& weight, double eps, bool fused) {
  if (fused && fp32_cpu({x, weight})) return FusedRMSNorm::apply(x, weight, eps);
  const auto dt = compute_dtype(x.scalar_type());
  auto xf = x.to(dt);
  auto y = xf * torch::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps) * weight.to(dt);
  return y.to(x.scalar_type());
}

torch::Tensor RMSNormImpl::forward(const torch::Tensor& x) { return rms_norm(x, weight, eps, fused); }

QKNorm parse_qk_norm(const std::string& text) {
  if (text == "before_rotation") return QKNorm::before_rotation;
  if (text == "after_rotation") return QKNorm::after_rotation;
  if (text == "off") return QKNorm::off;
  if (auto b = text_to_bool(text)) return *b ? QKNorm::before_rotation : QKNorm::off;  // once a boolean
  throw std::invalid_argument(
      fmt::format("qk_norm='{}' is not one of before_rotation|after_rotation|off", text));
}

void check_qk_norm(QKNorm qk_norm, const Encoding& enc) {
  if (qk_norm != QKNorm::after_rotation || enc.properties().qk_norm_after_encode) return;
  throw std::invalid_argument(fmt::format(
      "qk_norm=after_rotation is not defined for the encoding '{}': its encode scales q and k, reads them "
      "for its bias, or leaves the rotation to attention (xpos, YaRN/LongRoPE temperatures, dynamic NTK, "
      "TAPE, grape-a-*), so normalising its output would change the encoding itself; use "
      "qk_norm=before_rotation",
      enc.name()));
}

AttentionSublayer::AttentionSublayer(torch::nn::Module& owner, const ModelConfig& c, EncodingPtr pe)
    : H_(c.n_head), D_(c.head_dim()), qk_norm_(parse_qk_norm(c.qk_norm)), pe_(std::move(pe)) {
  check_qk_norm(qk_norm_, *pe_);
  const int64_t C = c.n_embd;
  auto linear = [&](const char* name, int64_t in, int64_t out) {
    return owner.register_module(name, torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false)));
  };
  wq_ = linear("wq", C, H_ * D_);
  wk_ = linear("wk", C, H_ * D_);
  wv_ = linear("wv", C, H_ * D_);
  wo_ = linear("wo", H_ * D_, C);
  if (qk_norm_ != QKNorm::off) {
    const bool fused = c.block == "fused";                                      // the one-pass RMSNorm kernel
    q_norm_ = owner.register_module("q_norm", RMSNorm(D_, c.norm_eps, fused));  // one gain over D, shared
    k_norm_ = owner.register_module("k_norm", RMSNorm(D_, c.norm_eps, fused));
  }
  if (c.kv_shift) kv_shift_ = owner.register_module("kv_shift", KVShift(c.head_shape()));
  owner.register_module("pe", pe_);
  props_ = pe_->properties();
  impl_ = parse_attention_impl(c.attention);
  fused_projections_ = c.block == "fused";
}

AttentionSublayer::Output AttentionSublayer::forward(const torch::Tensor& xh,
                                                     const std::vector<RowGroup>& groups,
                                                     const torch::Tensor* stream,
                                                     std::vector<torch::Tensor>* logits) {
  const int64_t B = xh.size(0), T = xh.size(1);
  torch::Tensor q, k, v;
  if (fused_projections_ && fp32_cpu({xh, wq_->weight, wk_->weight, wv_->weight})) {
    auto qkv = FusedQKV::apply(xh, wq_->weight, wk_->weight, wv_->weight);
    q = qkv[0], k = qkv[1], v = qkv[2];
  } else {
    q = wq_(xh), k = wk_(xh), v = wv_(xh);
  }
  q = q.view({B, T, H_, D_}), k = k.view({B, T, H_, D_}), v = v.view({B, T, H_, D_});
  std::vector<torch::Tensor> ys, streams;
  for (const auto& g : groups) {
    // One group of all rows (training, eval) takes the tensors whole: a narrow's backward scatters into a
    // zero-filled copy of the full gradient (two passes over each of x̂, q, k, v per layer).
    auto rows = [&](const torch::Tensor& t) { return g.rows == B ? t : t.narrow(0, g.row, g.rows); };
    auto xg = rows(xh), qg = rows(q), kg = rows(k), vg = rows(v);
    if (kv_shift_) std::tie(kg, vg) = kv_shift_(kg, vg, xg, *g.shift);  // on the raw projections, first
    if (qk_norm_ == QKNorm::before_rotation) {  // normalise, then encode: the relative law stays exact
      qg = q_norm_(qg);
      kg = k_norm_(kg);
    }
    auto Eg = props_.reads_stream ? rows(*stream) : torch::Tensor();
    auto tokens = pe_->encode(qg, kg, TokenContext(xg, Eg), *g.pe);
    if (qk_norm_ == QKNorm::after_rotation) {  // normalise what the dot product sees, before it is cached
      tokens.q = q_norm_(tokens.q);
      tokens.k = k_norm_(tokens.k);
    }
    g.keys->append(tokens, vg);  // the cache keeps exactly what the dot product uses, plus v
    auto out = attend(*pe_, tokens, *g.keys, impl_, /*average_stream=*/props_.updates_stream);
    if (logits) logits->push_back(attention_logits(*pe_, tokens, *g.keys));
    ys.push_back(out.y);
    if (props_.updates_stream) streams.push_back(pe_->stream_after_attention(Eg, out.stream));
  }
  auto y = ys.size() == 1 ? ys[0] : torch::cat(ys, 0);
  Output o{wo_(y.reshape({B, T, H_ * D_})), {}};
  if (props_.updates_stream) o.stream = streams.size() == 1 ? streams[0] : torch::cat(streams, 0);
  return o;
}

class BlockImpl : public torch::nn::Module {
 public:
  // Registers norm1, the attention sublayer's modules, norm2 and the MLP, in that order (the init's order).
  BlockImpl(const ModelConfig& c, EncodingPtr pe)
      : norm1_(register_module("norm1", RMSNorm(c.n_embd, c.norm_eps, c.block == "fused"))),
        attn_(*this, c, std::move(pe)),
        fused_block_(c.block == "fused") {
    const int64_t C = c.n_embd, hidden = c.hidden();
    auto linear = [&](const char* name, int64_t in, int64_t out) {
      return register_module(name, torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false)));
    };
    updates_stream_ = attn_.pe()->properties().updates_stream;
    norm2_ = register_module("norm2", RMSNorm(C, c.norm_eps, fused_block_));
    w1_ = linear("w1", C, hidden);
    w2_ = linear("w2", C, hidden);
    w_out_ = linear("w_out", hidden, C);
  }

  // x [B,T,C] → x + Attn(RMSNorm(x)) + MLP(...); `groups` partition the rows and carry their state.
  // stream: the position state E [B,T,H,D] of these tokens when the encoding carries one (TAPE), read and
  // updated in place (else null).
  torch::Tensor forward(const torch::Tensor& x, const std::vector<RowGroup>& groups, torch::Tensor* stream) {
    auto xh = norm1_(x);  // x̂: the projections, the gates and contextual encodings all read it
    auto attn = attn_.forward(xh, groups, stream);
    auto h = x + attn.y;
    const auto &g = norm2_->weight, &w1 = w1_->weight, &w2 = w2_->weight, &w_out = w_out_->weight;
    if (fused_block_ && !updates_stream_ && fp32_cpu({h, g, w1, w2, w_out}))  // TAPE needs the MLP alone
      return FusedMLP::apply(h, g, w1, w2, w_out, norm2_->eps);
    auto hn = norm2_(h);
    auto mlp = w_out_(swiglu(w1_(hn), w2_(hn), fused_block_));
    if (updates_stream_) *stream = attn_.pe()->stream_after_mlp(attn.stream, mlp);
    return h + mlp;
  }

  const EncodingPtr& pe() const { return attn_.pe(); }
  torch::nn::Linear& wo() { return attn_.wo(); }
  torch::nn::Linear& w_out() { return w_out_; }

 private:
  RMSNorm norm1_{nullptr}, norm2_{nullptr};
  AttentionSublayer attn_;
  bool fused_block_;  // RMSNorm and SwiGLU on the one-pass kernels (block=fused)
  bool updates_stream_ = false;
  torch::nn::Linear w1_{nullptr}, w2_{nullptr}, w_out_{nullptr};
};

TransformerImpl::TransformerImpl(const ModelConfig& config) : config_(config) {
  config_.validate();
  const auto& c = config_;
  const auto shape = c.head_shape();
  wte_ = register_module("wte", torch::nn::Embedding(c.vocab_size, c.n_embd));
  // Absolute encodings act once, on the embeddings; the layers then carry no position signal.
  auto probe = make_encoding(c.pe, shape, PeOptions(c.pe_options));
  const bool embeds = probe->properties().embeds;
  if (embeds) embed_pe_ = register_module("pe", probe);
  auto list = register_module("blocks", torch::nn::ModuleList());
  // The last layer of an encoding that updates a position state (TAPE) would update one nobody reads: it
  // is built with the option updates=false, which such encodings accept (and then have no update weights).
  const bool updates_stream = probe->properties().updates_stream;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    PeOptions opts(c.pe_options);
    if (updates_stream && l == c.n_layer - 1) opts.set("updates", "false");
    auto pe = embeds ? make_encoding("nope", shape)
                     : (l == 0 && !opts.has("updates") ? probe : make_encoding(c.pe, shape, opts));
    blocks_.push_back(std::make_shared<BlockImpl>(c, pe));
    list->push_back(blocks_.back());
  }
  norm_f_ = register_module("norm_f", RMSNorm(c.n_embd, c.norm_eps, c.block == "fused"));

  // The paper's init: every linear weight N(0, (0.5/sqrt(C))^2), the two residual outputs scaled down
  // by sqrt(n_layer), the tied embedding N(0, embed_std^2). Encodings and KV-shift keep their own init.
  torch::NoGradGuard no_grad;
  const double sd = 0.5 / std::sqrt(double(c.n_embd)), sd_out = sd / std::sqrt(double(c.n_layer));
  wte_->weight.normal_(0.0, c.embed_std);
  for (auto& b : blocks_) {
    for (auto& item : b->named_parameters(/*recurse=*/true)) {
      const auto& name = item.key();
      const bool own = name.rfind("pe.", 0) != 0 && name.rfind("kv_shift.", 0) != 0;
      if (own && item.value().dim() >= 2) item.value().normal_(0.0, sd);
    }
    b->wo()->weight.normal_(0.0, sd_out);
    b->w_out()->weight.normal_(0.0, sd_out);
  }
}

int64_t TransformerImpl::num_parameters() const {
  std::unordered_set<const void*> seen;  // a tensor reachable twice (tied weights) counts once
  int64_t n = 0;
  for (const auto& p : parameters(true))
    if (seen.insert(p.unsafeGetTensorImpl()).second) n += p.numel();
  return n;
}

torch::Tensor TransformerImpl::initial_stream(const std::vector<int64_t>& offsets, int64_t T,
                                              torch::ScalarType dtype) const {
  const auto& pe = blocks_.front()->pe();
  if (!pe->properties().reads_stream) return {};
  const int64_t B = int64_t(offsets.size());
  if (std::all_of(offsets.begin(), offsets.end(), [&](int64_t o) { return o == offsets[0]; }))
    return pe->initial_stream(B, offsets[0], T, dtype);  // one table, broadcast over the batch
  std::vector<torch::Tensor> rows;                       // each row starts at its own position
  for (int64_t off : offsets) rows.push_back(pe->initial_stream(1, off, T, dtype));
  return rows.size() == 1 ? rows[0] : torch::cat(rows, 0);
}

std::vector<EncodingPtr> TransformerImpl::encodings() const {
  std::vector<EncodingPtr> out;
  for (const auto& b : blocks_) out.push_back(b->pe());
  return out;
}

torch::Tensor TransformerImpl::forward(const torch::Tensor& tokens) {
  auto ids = check_ids(tokens, config_.vocab_size, "tokens");
  const int64_t B = ids.size(0);
  auto h = wte_(ids);
  if (embed_pe_) h = embed_pe_->embed(h, 0);
  auto stream = initial_stream(std::vector<int64_t>(B, 0), ids.size(1), h.scalar_type());
  for (auto& b : blocks_) {
    // A fresh state and cache per layer: the whole batch starts at position 0 with nothing cached.
    PeState st = b->pe()->initial_state(B, 0);
    KeyCache keys;
    KVShiftState shift;
    h = b->forward(h, {RowGroup{0, B, &st, &keys, &shift}}, stream.defined() ? &stream : nullptr);
  }
  h = norm_f_(h);
  return torch::matmul(h, wte_->weight.t()).to(torch::kFloat32);  // tied LM head
}

torch::Tensor TransformerImpl::loss(const torch::Tensor& tokens, const torch::Tensor& targets,
                                    const torch::Tensor& mask) {
  auto y = check_ids(targets, config_.vocab_size, "targets");
  if (!y.sizes().equals(tokens.sizes()))
    throw std::invalid_argument(fmt::format("model: targets {} must have the shape of tokens {}",
                                            shape_string(y), shape_string(tokens)));
  auto logits = forward(tokens);
  const int64_t V = logits.size(-1);
  auto ce = torch::nn::functional::cross_entropy(
      logits.reshape({-1, V}), y.reshape({-1}),
      torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
  if (!mask.defined()) return ce.mean();
  if (!mask.sizes().equals(tokens.sizes()))
    throw std::invalid_argument(fmt::format("model: mask {} must have the shape of tokens {}",
                                            shape_string(mask), shape_string(tokens)));
  auto m = mask.to(torch::kFloat32).reshape({-1});
  auto total = m.sum();
  if (!(total.item<double>() > 0)) throw std::invalid_argument("model: the loss mask selects no targets");
  return (m * ce).sum() / total;
}

SequenceCache TransformerImpl::new_cache() const {
  SequenceCache cache;
  for (const auto& b : blocks_)
    cache.layers.push_back({b->pe()->initial_state(1, 0), KeyCache{}, KVShiftState{}});
  return cache;
}

torch::Tensor TransformerImpl::forward_cached(const torch::Tensor& tokens,
                                              std::vector<SequenceCache*>& caches) {
  auto ids = check_ids(tokens, config_.vocab_size, "tokens");
  const int64_t B = ids.size(0), T = ids.size(1);
  if (int64_t(caches.size()) != B)
    throw std::invalid_argument(
        fmt::format("model: forward_cached got {} caches for a batch of {} rows", caches.size(), B));
  for (auto* c : caches)
    if (!c || c->layers.size() != blocks_.size())
      throw std::invalid_argument(
          fmt::format("model: every cache must come from new_cache() ({} layers)", blocks_.size()));
  auto h = wte_(ids);
  if (embed_pe_) {  // each row embeds at its own position
    std::vector<torch::Tensor> rows;
    for (int64_t b = 0; b < B; ++b) rows.push_back(embed_pe_->embed(h.narrow(0, b, 1), caches[b]->length));
    h = torch::cat(rows, 0);
  }
  std::vector<int64_t> offsets;
  for (auto* c : caches) offsets.push_back(c->length);
  auto stream = initial_stream(offsets, T, h.scalar_type());
  for (size_t l = 0; l < blocks_.size(); ++l) {
    std::vector<RowGroup> groups;
    for (int64_t b = 0; b < B; ++b) {
      auto& layer = caches[b]->layers[l];
      groups.push_back({b, 1, &layer.pe, &layer.keys, &layer.shift});
    }
    h = blocks_[l]->forward(h, groups, stream.defined() ? &stream : nullptr);
  }
  for (auto* c : caches) c->length += T;
  h = norm_f_(h);
  return torch::matmul(h, wte_->weight.t()).to(torch::kFloat32);
}

}  // namespace grape
