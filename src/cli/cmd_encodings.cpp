// `grape encodings [NAME]`: the registry, one line each, or one encoding in detail.
#include <fmt/format.h>

#include "cli/commands.hpp"
#include "grape/pe.hpp"

namespace grape::cli {
namespace {

// What an encoding does around attention, from its declared Properties: the hooks it uses and how the fused
// kernels compute its bias.
std::string hooks(const Encoding& enc) {
  const auto p = enc.properties();
  std::vector<std::string> h;
  if (p.embeds) h.push_back("embed");
  if (p.rotates) h.push_back("encode: rotate q, k");
  if (p.scales) h.push_back("encode: scale q, k");
  if (p.contextual) h.push_back("reads x");
  if (p.reads_stream) h.push_back(p.updates_stream ? "position stream (read, updated)" : "position stream");
  if (p.has_bias) h.push_back(fmt::format("bias (fused: {})", to_string(p.kernel_bias)));
  return h.empty() ? "none (attention without position)" : fmt::format("{}", fmt::join(h, ", "));
}

}  // namespace

void add_encodings_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("encodings", "list the encodings, or show one in detail");
  auto name = std::make_shared<std::string>();
  cmd->add_option("name", *name, "an encoding to describe");
  cmd->callback([name] {
    if (name->empty()) {
      for (const auto& e : encodings()) {
        std::vector<std::string> opts;
        for (const auto& o : e.options) opts.push_back(fmt::format("{}={}", o.key, o.default_value));
        fmt::print("{:<15} {:<17} {}\n", e.name, e.family, e.summary);
        fmt::print("{:<33} hooks:   {}\n", "", hooks(*make_encoding(e.name, {8, 64, 512})));
        if (!opts.empty()) fmt::print("{:<33} options: {}\n", "", fmt::join(opts, " "));
        for (const auto& p : e.parameters) fmt::print("{:<33} param:   {}\n", "", p);
      }
      return;
    }
    const auto& e = encoding_info(*name);
    fmt::print("{} ({})\n  {}\n", e.name, e.family, e.summary);
    fmt::print(
        "\noptions (--pe-set key=value for train, bench and pe logits; --set pe.key=value; "
        "[model.pe_options] "
        "in a --config file):\n");
    if (e.options.empty()) fmt::print("  none\n");
    for (const auto& o : e.options)
      fmt::print("  {:<16} default {:<10} {}\n", o.key, o.default_value, o.help);
    fmt::print("\nlearnable parameters:\n");
    if (e.parameters.empty()) fmt::print("  none\n");
    for (const auto& p : e.parameters) fmt::print("  {}\n", p);
    const HeadShape example{8, 64, 512};
    auto enc = make_encoding(e.name, example);
    auto props = enc->properties();
    fmt::print("\nat H=8, D=64, C=512: {} learnable numbers\n", [&] {
      int64_t n = 0;
      for (const auto& p : enc->parameters()) n += p.numel();
      return n;
    }());
    for (const auto& line : enc->describe_parameters()) fmt::print("  {}\n", line);
    fmt::print("\nhooks: {}\n", hooks(*enc));
    fmt::print("laws: relative={} norm-preserving={}\n", props.relative || props.phase_relative,
               props.rotates);
  });
}

}  // namespace grape::cli
