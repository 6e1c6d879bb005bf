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

// The checkpoint name the file checkpoints/latest holds (trailing newline/spaces dropped); a regular file
// of at most a few bytes: a symlink to a device or a FIFO is refused, not read.
std::string read_latest_name(const fs::path& root) {
  std::string name = io::read_file((root / "latest").string(), io::kMaxNameFileBytes);
  while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
  return name;
}

// step_ and a step number: the only names `latest` may hold.
bool is_checkpoint_name(const std::string& name) {
  if (name.size() <= 5 || name.size() > 5 + 19 || name.rfind("step_", 0) != 0) return false;
  return std::all_of(name.begin() + 5, name.end(), [](char c) { return c >= '0' && c <= '9'; });
}

// A name from a file, as error messages quote it: overlong or binary names are cut short and escaped.
std::string quoted_name(const std::string& name) {
  std::string out;
  for (size_t i = 0; i < name.size() && i < 64; ++i) {
    const auto c = static_cast<unsigned char>(name[i]);
    out += (c >= 32 && c < 127) ? std::string(1, static_cast<char>(c)) : fmt::format("\\x{:02x}", c);
  }
  if (name.size() > 64) out += fmt::format("... ({} bytes)", name.size());
  return "'" + out + "'";
}

// The optional fields of state.json a resume reads: the right JSON type, or an error naming the key.
void check_state_fields(const json& state, const std::string& path) {
  if (state.contains("tokens") && !state["tokens"].is_number())
    throw std::runtime_error(fmt::format("{}: \"tokens\" is {}, not a number", path, state["tokens"].dump()));
  if (state.contains("world_size") && !state["world_size"].is_number_integer())
    throw std::runtime_error(
        fmt::format("{}: \"world_size\" is {}, not an integer", path, state["world_size"].dump()));
}

// AdamW's moments, as loaded, fit their parameters: the same shapes, finite, a non-negative second moment
// (whose square root the step takes). A damaged optimizer.pt with a valid checksum is refused by name here
// rather than turning the first step's weights into NaN.
void check_optimizer_state(torch::optim::AdamW& optimizer, const std::string& path) {
  const auto& state = optimizer.state();
  int64_t index = 0;
  for (auto& group : optimizer.param_groups()) {
    for (const auto& p : group.params()) {
      const auto it = state.find(c10::guts::to_string(p.unsafeGetTensorImpl()));
      const int64_t i = index++;
      if (it == state.end()) continue;  // no step taken for it yet
      const auto& s = static_cast<const torch::optim::AdamWParamState&>(*it->second);
      auto bad = [&](const std::string& why) {
        return std::runtime_error(fmt::format("{}: the state of parameter {} {}", path, i, why));
      };
      if (!s.exp_avg().defined() || !s.exp_avg_sq().defined() || !s.exp_avg().sizes().equals(p.sizes()) ||
          !s.exp_avg_sq().sizes().equals(p.sizes()))
        throw bad(fmt::format("does not have the parameter's shape {}", shape_string(p)));
      if (!torch::isfinite(s.exp_avg()).all().item<bool>() ||
          !torch::isfinite(s.exp_avg_sq()).all().item<bool>())
        throw bad("is not finite");
      if (s.exp_avg_sq().numel() > 0 && s.exp_avg_sq().min().item<double>() < 0)
        throw bad("has a negative second moment");
      if (s.step() < 0) throw bad(fmt::format("has step {}", s.step()));
    }
  }
}

// The path of a file state.json names: a plain regular file inside the checkpoint directory. An absolute
// path, "..", a subdirectory or a symlink (which could lead to /proc/self/mem or /dev/zero) is refused.
std::string checkpoint_member(const std::string& dir, const std::string& name) {
  if (name.empty() || name == "." || name == ".." || name.find('/') != std::string::npos ||
      name.find('\0') != std::string::npos || name.size() > 255)
    throw std::runtime_error(
        fmt::format("{}/state.json: names the file {}, which is not a plain file name inside the checkpoint",
                    dir, quoted_name(name)));
  const fs::path path = fs::path(dir) / name;
  std::error_code ec;
  const auto st = fs::symlink_status(path, ec);
  if (!fs::exists(st))
    throw std::runtime_error(
        fmt::format("{}/state.json: names {}, which is missing", dir, quoted_name(name)));
  if (!fs::is_regular_file(st))
    throw std::runtime_error(
        fmt::format("{}/{}: not a regular file (a symlink or special file); a checkpoint holds its own files",
                    dir, name));
  return path.string();
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
  auto read = [](const std::string& path, uint64_t max_bytes = 0) {
    ++g_checkpoint_reads[path];
    return io::read_file(path, max_bytes);
  };
  const auto path = (fs::path(dir) / "state.json").string();
  if (!fs::exists(path)) throw std::runtime_error(fmt::format("{}: not a checkpoint (no state.json)", dir));
  LoadedCheckpoint ck;
  ck.dir = dir;
  ck.state = parse_json(read(path, io::kMaxSettingsBytes), path);
  const json& state = ck.state;
  if (!state.is_object() || !state.contains("format") || state["format"] != kCheckpointFormat)
    throw std::runtime_error(fmt::format("{}: unsupported checkpoint format {} (this grape reads {})", dir,
                                         state.is_object() ? state.value("format", json()).dump() : "?",
                                         kCheckpointFormat));
  if (!state.contains("checksums") || !state["checksums"].is_object() || !state.contains("step") ||
      !state["step"].is_number_integer())
    throw std::runtime_error(fmt::format("{}: state.json lacks its checksums or step", dir));
  ck.step = state["step"].get<int64_t>();
  check_state_fields(state, path);
  for (const auto& [file, sum] : state["checksums"].items()) {
    const auto file_path = checkpoint_member(dir, file);
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
  std::error_code ec;
  if (fs::exists(fs::symlink_status(root / "latest", ec))) {
    std::string why;  // why `latest` names no checkpoint
    try {
      latest = read_latest_name(root);
      if (!is_checkpoint_name(latest))
        why = fmt::format("{}: names {}, not a checkpoint", (root / "latest").string(), quoted_name(latest));
    } catch (const std::exception& e) {
      why = e.what();
    }
    if (!why.empty()) {
      point.skipped.push_back(why);
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
  } catch (const std::exception& e) {  // TorchScript's parser throws its own errors on a damaged archive
    std::string why = e.what();
    why = why.substr(0, why.find('\n'));  // its first line; the rest is a source excerpt of the damage
    throw std::runtime_error(
        fmt::format("{}: cannot load the optimizer state (the file is damaged): {}", path, why));
  }
  check_optimizer_state(optimizer, path);
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
    if (!rec.is_object() || !rec.contains("step") || !rec["step"].is_number_integer()) break;  // damaged too
    if (rec["step"].get<int64_t>() <= last_step) kept += line + "\n";
  }
  io::write_file_atomic(path, kept);
}

std::vector<json> read_metrics(const std::string& run_dir) {
  const auto path = (fs::path(run_dir) / "metrics.jsonl").string();
  std::istringstream in(io::read_file(path));
  std::vector<json> records;
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (line.empty()) continue;
    json rec;
    try {
      rec = json::parse(line);
    } catch (const json::exception& e) {
      throw std::runtime_error(fmt::format("{}:{}: not valid JSON ({})", path, n, e.what()));
    }
    if (!rec.is_object() || !rec.contains("step") || !rec["step"].is_number_integer())
      throw std::runtime_error(fmt::format("{}:{}: the record has no integer \"step\"", path, n));
    for (const char* key : {"loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "time_s"})
      if (rec.contains(key) && !rec[key].is_number())
        throw std::runtime_error(
            fmt::format("{}:{}: \"{}\" is {}, not a number", path, n, key, rec[key].dump()));
    records.push_back(std::move(rec));
  }
  return records;
}

}  // namespace detail

RunInfo read_run(const std::string& dir) {
  const auto path = (fs::path(dir) / "run.json").string();
  if (!fs::exists(path))
    throw std::runtime_error(fmt::format("{}: not a grape run directory (no run.json)", dir));
  auto run = parse_json(io::read_file(path, io::kMaxSettingsBytes), path);
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
  if (!is_checkpoint_name(name) || !fs::is_directory(dir))
    throw std::runtime_error(
        fmt::format("{}: points at {}, which is not a checkpoint", latest.string(), quoted_name(name)));
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
