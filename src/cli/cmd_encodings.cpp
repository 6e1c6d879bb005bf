// `grape encodings [NAME]`: the registry, one line each, or one encoding in detail.
#include <fmt/format.h>

#include "cli/commands.hpp"
#include "grape/pe.hpp"

namespace grape::cli {

void add_encodings_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("encodings", "list the encodings, or show one in detail");
  auto name = std::make_shared<std::string>();
  cmd->add_option("name", *name, "an encoding to describe");
  cmd->callback([name] {
    if (name->empty()) {
      for (const auto& e : encodings()) {
        std::vector<std::string> opts;
        for (const auto& o : e.options) opts.push_back(fmt::format("{}={}", o.key, o.default_value));
        fmt::print("{:<15} {:<15} {}\n", e.name, e.family, e.summary);
        if (!opts.empty()) fmt::print("{:<31} options: {}\n", "", fmt::join(opts, " "));
        for (const auto& p : e.parameters) fmt::print("{:<31} param:   {}\n", "", p);
      }
      return;
    }
    const auto& e = encoding_info(*name);
    fmt::print("{} ({})\n  {}\n", e.name, e.family, e.summary);
    fmt::print("\noptions (--set key=value):\n");
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
    fmt::print("\nhooks: embed={} rotate={} scale={} bias={} contextual={} relative={}\n", props.embeds,
               props.rotates, props.scales, props.has_bias, props.contextual,
               props.relative || props.phase_relative);
  });
}

}  // namespace grape::cli
