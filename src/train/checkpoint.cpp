// Run directories and checkpoints: written atomically (temporary directory + rename, then `latest`),
// verified on read (format version, FNV-1a checksums of the files, tensor names and shapes).
#include <fmt/format.h>

#include <algorithm>
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

json parse_json(const std::string& text, const std::string& path) {
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

// The checkpoint name the file checkpoints/latest holds (trailing newline/spaces dropped).
std::string read_latest_name(const fs::path& root) {
  std::string name = io::read_file((root / "latest").string());
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
  return name;
}

}  // namespace

namespace detail {

std::string tokenizer_file(const std::string& kind) {
  if (kind == "sentencepiece") return "tokenizer.model";
  if (kind == "bpe") return "tokenizer.json";
  return "";
}

void write_run(const std::string& dir, const ModelConfig& model, const TrainConfig& train,
               const data::Tokenizer& tok, const json& extra) {
  fs::create_directories(dir);
  json run;
  run["format"] = kCheckpointFormat;
  run["model"] = json::parse(model.to_json());
  run["train"] = json::parse(train.to_json());
  run["tokenizer"] = tok.kind();
  for (const auto& [key, value] : extra.items()) run[key] = value;
  io::write_file_atomic((fs::path(dir) / "run.json").string(), run.dump(2) + "\n");
  if (const auto file = tokenizer_file(tok.kind()); !file.empty())
    io::write_file_atomic((fs::path(dir) / file).string(), tok.model_bytes());
}

std::string checkpoint_path(const std::string& run_dir, int64_t step) {
  return (fs::path(run_dir) / "checkpoints" / step_name(step)).string();
}

std::string write_checkpoint(const std::string& run_dir, int64_t step, Transformer& model,
                             torch::optim::AdamW& optimizer, json state, int64_t keep_last) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  fs::create_directories(root);
  const std::string name = step_name(step);
  const fs::path tmp = root / (".tmp." + name);
  fs::remove_all(tmp);  // leftovers of an interrupted write
  try {
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
    state["checksums"] = {
        {"model.safetensors", checksum(io::read_file((tmp / "model.safetensors").string()))},
        {"optimizer.pt", checksum(opt_bytes.str())}};
    io::write_file_atomic((tmp / "state.json").string(), state.dump(2) + "\n");
  } catch (const std::exception& e) {
    // A full disk (or any failed write): nothing of this checkpoint may look complete, and the previous
    // one was never touched (latest still points at it).
    std::error_code ec;
    fs::remove_all(tmp, ec);
    std::string previous = "none was written yet";
    try {
      previous = "the previous checkpoint " + latest_checkpoint(run_dir) + " is intact";
    } catch (const std::exception&) {
    }
    throw std::runtime_error(fmt::format("cannot write checkpoint {} ({}); {}", name, e.what(), previous));
  }

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

namespace {
std::map<std::string, int> g_checkpoint_reads;  // read_checkpoint's files by path (the test hook)
}  // namespace

const std::map<std::string, int>& checkpoint_file_reads() { return g_checkpoint_reads; }

const std::string& LoadedCheckpoint::file(const std::string& name) const {
  const auto it = files.find(name);
  if (it == files.end())
    throw std::runtime_error(fmt::format("{}: state.json has no checksum of {}", dir, name));
  return it->second;
}

LoadedCheckpoint read_checkpoint(const std::string& dir) {
  auto read = [](const std::string& path) {
    ++g_checkpoint_reads[path];
    return io::read_file(path);
  };
  const auto path = (fs::path(dir) / "state.json").string();
  if (!fs::exists(path)) throw std::runtime_error(fmt::format("{}: not a checkpoint (no state.json)", dir));
  LoadedCheckpoint ck;
  ck.dir = dir;
  ck.state = parse_json(read(path), path);
  const json& state = ck.state;
  if (!state.is_object() || !state.contains("format") || state["format"] != kCheckpointFormat)
    throw std::runtime_error(fmt::format("{}: unsupported checkpoint format {} (this grape reads {})", dir,
                                         state.is_object() ? state.value("format", json()).dump() : "?",
                                         kCheckpointFormat));
  if (!state.contains("checksums") || !state["checksums"].is_object() || !state.contains("step") ||
      !state["step"].is_number_integer())
    throw std::runtime_error(fmt::format("{}: state.json lacks its checksums or step", dir));
  ck.step = state["step"].get<int64_t>();
  for (const auto& [file, sum] : state["checksums"].items()) {
    const auto file_path = (fs::path(dir) / file).string();
    if (!fs::exists(file_path)) throw std::runtime_error(fmt::format("{}: {} is missing", dir, file));
    std::string bytes = read(file_path);
    if (!sum.is_string() || checksum(bytes) != sum.get<std::string>())
      throw std::runtime_error(
          fmt::format("{}/{}: checksum mismatch: the file is corrupt or truncated", dir, file));
    ck.files[file] = std::move(bytes);
  }
  return ck;
}

ResumePoint find_resume_checkpoint(const std::string& run_dir) {
  ResumePoint point;
  const fs::path root = fs::path(run_dir) / "checkpoints";
  if (!fs::is_directory(root)) return point;
  // The newest first: `latest` names the last checkpoint completed; then the others, newest to oldest.
  // A directory newer than `latest` was renamed into place by a run killed before it updated `latest`;
  // it is complete, but `latest` is the commit point, so it is passed over (its step is written again).
  std::vector<std::string> names;
  for (const auto& e : fs::directory_iterator(root))
    if (e.is_directory() && e.path().filename().string().rfind("step_", 0) == 0)
      names.push_back(e.path().filename().string());
  std::sort(names.rbegin(), names.rend());
  std::string latest;
  if (fs::exists(root / "latest")) {
    latest = read_latest_name(root);
    if (latest.rfind("step_", 0) != 0 || latest.find('/') != std::string::npos) {
      point.skipped.push_back(
          fmt::format("{}: names '{}', not a checkpoint", (root / "latest").string(), latest));
      latest.clear();
    } else if (!fs::is_directory(root / latest)) {
      point.skipped.push_back(
          fmt::format("{}: names {}, which does not exist", (root / "latest").string(), latest));
    } else {
      names.erase(std::remove(names.begin(), names.end(), latest), names.end());
      names.insert(names.begin(), latest);
    }
  } else if (!names.empty()) {
    point.skipped.push_back(fmt::format("{}: missing", (root / "latest").string()));
  }
  for (const auto& name : names) {
    if (!latest.empty() && name > latest) continue;
    const std::string dir = (root / name).string();
    try {
      auto ck = read_checkpoint(dir);
      if (step_name(ck.step) != name)
        throw std::runtime_error(fmt::format("{}: state.json is for step {}", dir, ck.step));
      point.checkpoint = std::move(ck);
      return point;
    } catch (const std::exception& e) {
      point.skipped.push_back(e.what());
    }
  }
  if (!names.empty()) {
    std::string why;
    for (const auto& s : point.skipped) why += "\n  " + s;
    throw std::runtime_error(fmt::format("{}: no usable checkpoint; every one is damaged:{}", run_dir, why));
  }
  return point;  // no checkpoint at all: the run starts from step 0
}

void remove_stale_temporaries(const std::string& run_dir) {
  // Left by a process killed while writing: checkpoints/.tmp.step_N and the atomic writer's .NAME.tmp.*.
  for (const fs::path& dir : {fs::path(run_dir), fs::path(run_dir) / "checkpoints"}) {
    if (!fs::is_directory(dir)) continue;
    std::vector<fs::path> stale;
    for (const auto& e : fs::directory_iterator(dir)) {
      const auto n = e.path().filename().string();
      if (n.rfind(".tmp.", 0) == 0 || (n.size() > 1 && n[0] == '.' && n.find(".tmp.") != std::string::npos))
        stale.push_back(e.path());
    }
    for (const auto& p : stale) {
      std::error_code ec;
      fs::remove_all(p, ec);
    }
  }
}

void load_optimizer(torch::optim::AdamW& optimizer, const LoadedCheckpoint& ck) {
  const auto path = (fs::path(ck.dir) / "optimizer.pt").string();
  std::istringstream in(ck.file("optimizer.pt"));
  try {
    torch::load(optimizer, in);
  } catch (const c10::Error& e) {
    throw std::runtime_error(
        fmt::format("{}: cannot load the optimizer state: {}", path, e.what_without_backtrace()));
  }
}

void append_metrics(const std::string& run_dir, const json& record) {
  const auto path = fs::path(run_dir) / "metrics.jsonl";
  std::ofstream out(path, std::ios::app);
  out << record.dump() << "\n";
  if (!out) throw std::runtime_error(fmt::format("cannot append to {}", path.string()));
}

std::pair<json, json> last_metrics(const std::string& run_dir, int64_t last_step) {
  const auto path = (fs::path(run_dir) / "metrics.jsonl").string();
  json train, val;
  if (!fs::exists(path)) return {train, val};
  std::istringstream in(io::read_file(path));
  std::string line;
  while (std::getline(in, line)) {
    json rec;
    try {
      rec = json::parse(line);
    } catch (const json::exception&) {
      break;
    }
    if (!rec.is_object() || !rec.contains("step") || !rec["step"].is_number() ||
        rec["step"].get<int64_t>() > last_step)
      continue;
    if (rec.contains("loss") && rec["loss"].is_number()) train = rec;
    if (rec.contains("val_loss") && rec["val_loss"].is_number()) val = rec;
  }
  return {train, val};
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
  auto run = parse_json(io::read_file(path), path);
  RunInfo info;
  info.dir = dir;
  try {
    info.model = ModelConfig::from_json(run.at("model").dump());
    info.train = TrainConfig::from_json(run.at("train").dump());
    info.tokenizer = run.value("tokenizer", info.train.tokenizer == "byte" ? "byte" : "sentencepiece");
    info.data_fingerprint = run.value("data_fingerprint", "");
    info.json = run.dump();
  } catch (const json::exception& e) {
    throw std::runtime_error(fmt::format("{}: {}", path, e.what()));
  } catch (const std::invalid_argument& e) {  // a field the tables refuse: say which file holds it
    throw std::invalid_argument(fmt::format("{}: {}", path, e.what()));
  }
  return info;
}

std::unique_ptr<data::Tokenizer> run_tokenizer(const RunInfo& run) {
  if (run.tokenizer == "byte") return data::make_byte_tokenizer();
  if (run.tokenizer == "none") return data::make_id_tokenizer(run.model.vocab_size);
  const std::string file = detail::tokenizer_file(run.tokenizer);
  if (file.empty())
    throw std::runtime_error(
        fmt::format("{}: unknown tokenizer kind '{}' in run.json", run.dir, run.tokenizer));
  const auto own = fs::path(run.dir) / file;
  if (!fs::exists(own)) throw std::runtime_error(fmt::format("{}: the run's {} is missing", run.dir, file));
  if (run.tokenizer == "bpe") return data::bpe_from_bytes(io::read_file(own.string()));
  return data::load_sentencepiece(own.string());
}

std::string latest_checkpoint(const std::string& run_dir) {
  const fs::path root = fs::path(run_dir) / "checkpoints";
  const fs::path latest = root / "latest";
  if (!fs::exists(latest))
    throw std::runtime_error(fmt::format("{}: the run has no checkpoint yet", run_dir));
  const std::string name = read_latest_name(root);
  const fs::path dir = root / name;
  if (name.rfind("step_", 0) != 0 || !fs::is_directory(dir))
    throw std::runtime_error(
        fmt::format("{}: points at '{}', which is not a checkpoint", latest.string(), name));
  return dir.string();
}

void load_weights(Transformer& model, const std::string& dir) {
  detail::load_weights(model, detail::read_checkpoint(dir));
}

void detail::load_weights(Transformer& model, const LoadedCheckpoint& ck) {
  std::map<std::string, std::string> meta;
  const auto path = (fs::path(ck.dir) / "model.safetensors").string();
  auto tensors = io::safetensors_tensors(ck.file("model.safetensors"), path, &meta);
  if (meta.count("pe") && meta["pe"] != model->config().pe)
    throw std::runtime_error(fmt::format("{}: checkpoint was trained with encoding '{}', the model uses '{}'",
                                         path, meta["pe"], model->config().pe));
  torch::NoGradGuard no_grad;
  auto params = model->named_parameters();
  for (const auto& p : params) {
    auto it = tensors.find(p.key());
    if (it == tensors.end())
      throw std::runtime_error(
          fmt::format("{}: tensor '{}' is missing (the checkpoint is for another model "
                      "shape or encoding options)",
                      path, p.key()));
    if (!it->second.sizes().equals(p.value().sizes()))
      throw std::runtime_error(
          fmt::format("{}: tensor '{}' has shape {} in the checkpoint, the model expects {}", path, p.key(),
                      shape_string(it->second), shape_string(p.value())));
    p.value().copy_(it->second);
  }
  if (tensors.size() != params.size()) {
    for (const auto& [name, t] : tensors)
      if (!params.contains(name))
        throw std::runtime_error(
            fmt::format("{}: unexpected tensor '{}' (the checkpoint is for another model "
                        "shape or encoding options)",
                        path, name));
  }
}

Transformer load_model(const RunInfo& run, const std::string& checkpoint_dir) {
  Transformer model(run.model);
  load_weights(model, checkpoint_dir.empty() ? latest_checkpoint(run.dir) : checkpoint_dir);
  model->eval();
  return model;
}

}  // namespace grape::train
