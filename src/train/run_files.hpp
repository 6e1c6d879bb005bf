// Internal: the files of a run directory (see include/grape/train.hpp for the layout).
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "grape/train.hpp"

namespace grape::train::detail {

constexpr int kCheckpointFormat = 1;  // bumped when the checkpoint layout changes

// Writes run.json (and tokenizer.model when the tokenizer has one), atomically.
void write_run(const std::string& dir, const ModelConfig& model, const TrainConfig& train,
               const data::Tokenizer& tok);

// Writes checkpoints/step_NNNNNNNN (weights, optimizer, state with checksums) into a temporary directory,
// renames it into place, points `latest` at it, and removes all but the newest keep_last checkpoints.
// Returns the checkpoint directory.
std::string write_checkpoint(const std::string& run_dir, int64_t step, Transformer& model,
                             torch::optim::AdamW& optimizer, nlohmann::json state, int64_t keep_last);

// checkpoints/step_NNNNNNNN of a run.
std::string checkpoint_path(const std::string& run_dir, int64_t step);

// state.json of a checkpoint, after checking its format version and the checksums of its files.
nlohmann::json read_checkpoint_state(const std::string& checkpoint_dir);

// The checkpoint a resumed run continues from: the one `latest` names if it passes read_checkpoint_state,
// else the newest older one that does (each one passed over is listed in `skipped` with the reason).
// dir is empty when the run has no checkpoint at all (it starts again from step 0); when there are
// checkpoints but none is usable, throws listing why each was refused.
struct ResumePoint {
  std::string dir;
  int64_t step = 0;
  std::vector<std::string> skipped;
};
ResumePoint find_resume_checkpoint(const std::string& run_dir);
// Removes the temporaries of writes that a killed process left behind (never a complete file).
void remove_stale_temporaries(const std::string& run_dir);
void load_optimizer(torch::optim::AdamW& optimizer, const std::string& checkpoint_dir);

// Appends one JSON line to metrics.jsonl; rewrite_metrics keeps only records with step <= last_step.
void append_metrics(const std::string& run_dir, const nlohmann::json& record);
void truncate_metrics(const std::string& run_dir, int64_t last_step);

}  // namespace grape::train::detail
