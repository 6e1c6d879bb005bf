// Internal: the files of a run directory (see include/grape/train.hpp for the layout).
#pragma once

#include <nlohmann/json.hpp>

#include <string>

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

// state.json of a checkpoint, after checking its format version and the checksums of its files.
nlohmann::json read_checkpoint_state(const std::string& checkpoint_dir);
void load_optimizer(torch::optim::AdamW& optimizer, const std::string& checkpoint_dir);

// Appends one JSON line to metrics.jsonl; rewrite_metrics keeps only records with step <= last_step.
void append_metrics(const std::string& run_dir, const nlohmann::json& record);
void truncate_metrics(const std::string& run_dir, int64_t last_step);

}  // namespace grape::train::detail
