// The default thread pool of `grape`, chosen so that a busy machine never makes it slower than one thread.
#pragma once

#include <string>

namespace grape::cli {

// Sets LibTorch's intra-op threads: `requested` when > 0 (--threads), else the default (default_threads).
// Returns a note to print when the default left cores out because other processes keep them busy.
std::string set_threads(int requested);
// The default: the cores this process may use, minus those other processes keep busy right now.
int default_threads();
std::string threads_help();

}  // namespace grape::cli
