// Run directories and checkpoints: written atomically (temporary directory + rename, then `latest`),
// verified on read (format version, FNV-1a checksums of the files, tensor names and shapes).
#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "grape/io.hpp"
#include "train/run_files.hpp"

namespace grape::train {

namespace fs = std::filesystem;
using nlohmann::json;

namespace {

// FNV-1a 64: catches truncation and bit rot of checkpoint files; not a cryptographic hash.
std::string checksum(const std::string& bytes) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : bytes) h = (h ^ c) * 1099511628211ull;
  return fmt::format("{:016x}", h);
}

std::string step_name(int64_t step) { return fmt::format("step_{:08d}", step); }

json parse_json_file(const std::string& path) {
  auto text = io::read_file(path);
  try {
    return json::parse(text);
  } catch (const json::exception& e) {
    throw std::runtime_error(fmt::format("{}: not valid JSON ({})", path, e.what()));
  }
}

// Test hook: GRAPE_FAULT=checkpoint exits the process half-way through writing a checkpoint, as a crash or
// Ctrl-C would; the tests check that the previous checkpoint survives.
void maybe_crash_here() {
  const char* f = std::getenv("GRAPE_FAULT");
  if (f != nullptr && std::string(f) == "checkpoint") std::_Exit(3);
}

}  // namespace

namespace detail {

void write_run(const std::string& dir, const ModelConfig& model, const TrainConfig& train,
               const data::Tokenizer& tok) {
  fs::create_directories(dir);
  json run;
  run["format"] = kCheckpointFormat;
  run["model"] = json::parse(model.to_json());
  run["train"] = json::parse(train.to_json());
  run["tokenizer"] = tok.kind();
  io::write_file_atomic((fs::path(dir) / "run.json").string(), run.dump(2) + "\n");
  if (tok.kind() == "sentencepiece")
    io::write_file_atomic((fs::path(dir) / "tokenizer.model").string(), tok.model_bytes());
}

std::string write_checkpoint(const std::string& run_dir, int64_t step, Transformer& model,
                             torch::optim::AdamW& optimizer, json state, int64_t keep_last) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  fs::create_directories(root);
  const std::string name = step_name(step);
  const fs::path tmp = root / (".tmp." + name);
  fs::remove_all(tmp);  // leftovers of an interrupted write
  fs::create_directories(tmp);

  std::map<std::string, torch::Tensor> tensors;
  for (const auto& p : model->named_parameters()) tensors[p.key()] = p.value().detach();
  const std::map<std::string, std::string> meta = {{"pe", model->config().pe},
                                                   {"config", model->config().to_json()}};
  io::write_safetensors((tmp / "model.safetensors").string(), tensors, meta);
  maybe_crash_here();
  std::ostringstream opt_bytes;
  torch::save(optimizer, opt_bytes);
  io::write_file_atomic((tmp / "optimizer.pt").string(), opt_bytes.str());

  state["format"] = kCheckpointFormat;
  state["step"] = step;
  state["checksums"] = {{"model.safetensors", checksum(io::read_file((tmp / "model.safetensors").string()))},
                        {"optimizer.pt", checksum(opt_bytes.str())}};
  io::write_file_atomic((tmp / "state.json").string(), state.dump(2) + "\n");

  const fs::path final_dir = root / name;
  fs::remove_all(final_dir);  // a checkpoint of the same step from a run that was resumed earlier
  fs::rename(tmp, final_dir);
  io::write_file_atomic((root / "latest").string(), name + "\n");

  // Keep the newest keep_last complete checkpoints (names sort by step).
  std::vector<fs::path> all;
  for (const auto& e : fs::directory_iterator(root))
    if (e.is_directory() && e.path().filename().string().rfind("step_", 0) == 0) all.push_back(e.path());
  std::sort(all.begin(), all.end());
  for (size_t i = 0; i + size_t(std::max<int64_t>(keep_last, 1)) < all.size(); ++i)
    if (all[i] != final_dir) fs::remove_all(all[i]);
  return final_dir.string();
}

json read_checkpoint_state(const std::string& dir) {
  const auto path = (fs::path(dir) / "state.json").string();
  if (!fs::exists(path)) throw std::runtime_error(fmt::format("{}: not a checkpoint (no state.json)", dir));
  auto state = parse_json_file(path);
  if (!state.contains("format") || state["format"] != kCheckpointFormat)
    throw std::runtime_error(fmt::format("{}: unsupported checkpoint format {} (this grape reads {})", dir,
                                         state.value("format", json()).dump(), kCheckpointFormat));
  for (const auto& [file, sum] : state.at("checksums").items()) {
    const auto bytes = io::read_file((fs::path(dir) / file).string());
    if (checksum(bytes) != sum.get<std::string>())
      throw std::runtime_error(fmt::format("{}/{}: checksum mismatch: the file is corrupt or truncated", dir, file));
  }
  return state;
}

void load_optimizer(torch::optim::AdamW& optimizer, const std::string& dir) {
  const auto path = (fs::path(dir) / "optimizer.pt").string();
  std::istringstream in(io::read_file(path));
  try {
    torch::load(optimizer, in);
  } catch (const c10::Error& e) {
    throw std::runtime_error(fmt::format("{}: cannot load the optimizer state: {}", path,
                                         e.what_without_backtrace()));
  }
}

void append_metrics(const std::string& run_dir, const json& record) {
  const auto path = fs::path(run_dir) / "metrics.jsonl";
  std::ofstream out(path, std::ios::app);
  out << record.dump() << "\n";
  if (!out) throw std::runtime_error(fmt::format("cannot append to {}", path.string()));
}

void truncate_metrics(const std::string& run_dir, int64_t last_step) {
  const auto path = (fs::path(run_dir) / "metrics.jsonl").string();
  if (!fs::exists(path)) return;
  std::istringstream in(io::read_file(path));
  std::string line, kept;
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    json rec;
    try {
      rec = json::parse(line);
    } catch (const json::exception&) {
      break;  // a line cut short by a crash ends the usable log
    }
    if (rec.value("step", int64_t(0)) <= last_step) kept += line + "\n";
  }
  io::write_file_atomic(path, kept);
}

}  // namespace detail

RunInfo read_run(const std::string& dir) {
  const auto path = (fs::path(dir) / "run.json").string();
  if (!fs::exists(path))
    throw std::runtime_error(fmt::format("{}: not a grape run directory (no run.json)", dir));
  auto run = parse_json_file(path);
  RunInfo info;
  info.dir = dir;
  try {
    info.model = ModelConfig::from_json(run.at("model").dump());
    info.train = TrainConfig::from_json(run.at("train").dump());
  } catch (const json::exception& e) {
    throw std::runtime_error(fmt::format("{}: {}", path, e.what()));
  }
  return info;
}

std::unique_ptr<data::Tokenizer> run_tokenizer(const RunInfo& run) {
  if (run.train.tokenizer == "byte") return data::make_byte_tokenizer();
  const auto own = fs::path(run.dir) / "tokenizer.model";
  if (!fs::exists(own))
    throw std::runtime_error(fmt::format("{}: the run's tokenizer.model is missing", run.dir));
  return data::load_sentencepiece(own.string());
}

std::string latest_checkpoint(const std::string& run_dir) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  const fs::path latest = root / "latest";
  if (!fs::exists(latest)) throw std::runtime_error(fmt::format("{}: the run has no checkpoint yet", run_dir));
  std::string name = io::read_file(latest.string());
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
  const fs::path dir = root / name;
  if (name.rfind("step_", 0) != 0 || !fs::is_directory(dir))
    throw std::runtime_error(fmt::format("{}: points at '{}', which is not a checkpoint", latest.string(), name));
  return dir.string();
}

void load_weights(Transformer& model, const std::string& dir) {
  detail::read_checkpoint_state(dir);  // format and checksums first: a corrupt file gets that message
  std::map<std::string, std::string> meta;
  const auto path = (fs::path(dir) / "model.safetensors").string();
  auto tensors = io::read_safetensors(path, &meta);
  if (meta.count("pe") && meta["pe"] != model->config().pe)
    throw std::runtime_error(fmt::format("{}: checkpoint was trained with encoding '{}', the model uses '{}'",
                                         path, meta["pe"], model->config().pe));
  torch::NoGradGuard no_grad;
  auto params = model->named_parameters();
  for (const auto& p : params) {
    auto it = tensors.find(p.key());
    if (it == tensors.end())
      throw std::runtime_error(fmt::format("{}: tensor '{}' is missing (the checkpoint is for another model "
                                           "shape or encoding options)", path, p.key()));
    if (!it->second.sizes().equals(p.value().sizes()))
      throw std::runtime_error(fmt::format("{}: tensor '{}' has shape {} in the checkpoint, the model expects {}",
                                           path, p.key(), shape_string(it->second), shape_string(p.value())));
    p.value().copy_(it->second);
  }
  if (tensors.size() != params.size()) {
    for (const auto& [name, t] : tensors)
      if (!params.contains(name))
        throw std::runtime_error(fmt::format("{}: unexpected tensor '{}' (the checkpoint is for another model "
                                             "shape or encoding options)", path, name));
  }
}

Transformer load_model(const RunInfo& run, const std::string& checkpoint_dir) {
  Transformer model(run.model);
  load_weights(model, checkpoint_dir.empty() ? latest_checkpoint(run.dir) : checkpoint_dir);
  model->eval();
  return model;
}

}  // namespace grape::train
