// Internal: the files of a run directory (see include/grape/train.hpp for the layout).
#pragma once

#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "grape/train.hpp"

namespace grape::train::detail {

constexpr int kCheckpointFormat = 1;  // bumped when the checkpoint layout changes

// Writes run.json (and the tokenizer's own file: tokenizer.model for SentencePiece, tokenizer.json for BPE),
// atomically. `extra` holds run.json's other entries (provenance, resumes, data fingerprint).
void write_run(const std::string& dir, const ModelConfig& model, const TrainConfig& train,
               const data::Tokenizer& tok, const nlohmann::json& extra = nlohmann::json::object());
// The file a run keeps its tokenizer in ("" for byte and none).
std::string tokenizer_file(const std::string& kind);

// Writes checkpoints/step_NNNNNNNN (weights, optimizer, state with checksums) into a temporary directory,
// renames it into place, points `latest` at it, and removes all but the newest keep_last checkpoints.
// Returns the checkpoint directory.
std::string write_checkpoint(const std::string& run_dir, int64_t step, Transformer& model,
                             torch::optim::AdamW& optimizer, nlohmann::json state, int64_t keep_last);

// checkpoints/step_NNNNNNNN of a run.
std::string checkpoint_path(const std::string& run_dir, int64_t step);

// A checkpoint as read from disk, each file once: state.json and the bytes of the files it checksums,
// verified (format version, step, FNV-1a checksums) before anything uses them. Loading the weights and the
// optimizer parses these bytes, so no file is read or checksummed twice.
struct LoadedCheckpoint {
  std::string dir;
  int64_t step = 0;
  nlohmann::json state;
  std::map<std::string, std::string> files;  // "model.safetensors", "optimizer.pt" -> their verified bytes
  const std::string& file(const std::string& name) const;  // throws naming the checkpoint when absent
};
// Reads and verifies a checkpoint directory; throws naming the directory or the damaged file.
LoadedCheckpoint read_checkpoint(const std::string& checkpoint_dir);
// Test hook: how many times read_checkpoint has read each file (by path) in this process.
const std::map<std::string, int>& checkpoint_file_reads();

// The checkpoint a resumed run continues from: the one `latest` names if it passes read_checkpoint, else
// the newest older one that does (each one passed over is listed in `skipped` with the reason).
// `checkpoint` is empty when the run has no checkpoint at all (it starts again from step 0); when there are
// checkpoints but none is usable, throws listing why each was refused.
struct ResumePoint {
  std::optional<LoadedCheckpoint> checkpoint;
  std::vector<std::string> skipped;
};
ResumePoint find_resume_checkpoint(const std::string& run_dir);
// Removes the temporaries of writes that a killed process left behind (never a complete file).
void remove_stale_temporaries(const std::string& run_dir);
// The weights (as load_weights checks them) and the AdamW state of a checkpoint read by read_checkpoint.
void load_weights(Transformer& model, const LoadedCheckpoint& checkpoint);
void load_optimizer(torch::optim::AdamW& optimizer, const LoadedCheckpoint& checkpoint);

// Appends one JSON line to metrics.jsonl; truncate_metrics keeps only records with step <= last_step.
void append_metrics(const std::string& run_dir, const nlohmann::json& record);
void truncate_metrics(const std::string& run_dir, int64_t last_step);
// The last training record (with "loss") and the last validation record (with "val_loss") of
// metrics.jsonl up to last_step; null when there is none.
std::pair<nlohmann::json, nlohmann::json> last_metrics(const std::string& run_dir, int64_t last_step);
// The records of metrics.jsonl, each an object with an integer "step" and numbers for its other numeric
// fields; a damaged line is an error naming the file, the line and the field.
std::vector<nlohmann::json> read_metrics(const std::string& run_dir);

}  // namespace grape::train::detail
