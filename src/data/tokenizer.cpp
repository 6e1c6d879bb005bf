// Tokenizers: raw bytes (no training) and SentencePiece (trained on the data, stored with each run).
#include <dlfcn.h>
#include <fmt/format.h>
#include <fmt/ranges.h>
#include <sentencepiece_processor.h>  // for the sizes of its classes only: its functions come from dlopen

#include <filesystem>
#include <stdexcept>
#include <type_traits>
#include <unordered_map>

#include "grape/data.hpp"
#include "grape/io.hpp"

namespace grape::data {

namespace {

// ---- byte -------------------------------------------------------------------------------------------

class ByteTokenizer final : public Tokenizer {
 public:
  std::string kind() const override { return "byte"; }
  int64_t vocab_size() const override { return 257; }
  int64_t eot() const override { return 256; }
  std::vector<int32_t> encode(std::string_view text) const override {
    std::vector<int32_t> ids(text.size());
    for (size_t i = 0; i < text.size(); ++i) ids[i] = static_cast<unsigned char>(text[i]);
    return ids;
  }
  std::string decode(const std::vector<int32_t>& ids) const override {
    std::string out;
    out.reserve(ids.size());
    for (int32_t id : ids) out += piece(id);
    return out;
  }
  std::string piece(int32_t id) const override {
    if (id < 0 || id > 256)
      throw std::out_of_range(fmt::format("byte tokenizer: id {} is not in 0..256", id));
    return id == 256 ? std::string() : std::string(1, static_cast<char>(id));
  }
  std::string model_bytes() const override { return {}; }
};

// ---- none: token ids without text ----------------------------------------------------------------------

class IdTokenizer final : public Tokenizer {
 public:
  explicit IdTokenizer(int64_t vocab) : vocab_(vocab) {}
  std::string kind() const override { return "none"; }
  int64_t vocab_size() const override { return vocab_; }
  int64_t eot() const override { return -1; }
  std::vector<int32_t> encode(std::string_view) const override { throw std::invalid_argument(no_text()); }
  std::string decode(const std::vector<int32_t>&) const override { throw std::invalid_argument(no_text()); }
  std::string piece(int32_t) const override { throw std::invalid_argument(no_text()); }
  std::string model_bytes() const override { return {}; }

 private:
  static std::string no_text() {
    return "tokenizer 'none' has no text: it reads token ids from .bin files only (give a GPT-2 BPE "
           "vocabulary, tokenizer.json or vocab.json,merges.txt, to encode or decode text)";
  }
  int64_t vocab_;
};

// ---- SentencePiece, opened privately --------------------------------------------------------------------
//
// Debian's libsentencepiece carries its own copy of protobuf (3.14) and exports its symbols; LibTorch loads
// the system libprotobuf (3.21). Linked the usual way, one copy's symbols replace the other's and the
// process crashes before main. So the library is opened with dlopen, RTLD_LOCAL (its symbols stay out of
// the process's namespace) and RTLD_DEEPBIND (it binds to its own protobuf first), and its C++ functions are
// looked up by their Itanium-ABI names. A member function is called as a free function whose first
// argument is `this`; one that returns util::Status writes it through a hidden pointer, which RawStatus,
// a class of the same size that is not trivially destructible, reproduces.

// A sentencepiece::util::Status: a pointer to the error (null: OK), released by the library's destructor.
struct RawStatus {
  void* rep = nullptr;
  RawStatus() = default;
  RawStatus(const RawStatus&) = delete;
  ~RawStatus();
  bool ok() const { return rep == nullptr; }
  std::string text() const;
};
static_assert(sizeof(RawStatus) == sizeof(sentencepiece::util::Status));

struct SentencePieceApi {
  void (*construct)(void* self);
  void (*destroy)(void* self);
  RawStatus (*load)(void* self, std::string_view serialized);
  RawStatus (*encode)(const void* self, std::string_view text, std::vector<int>* ids);
  RawStatus (*decode)(const void* self, const std::vector<int>& ids, std::string* text);
  int (*piece_size)(const void* self);
  const std::string& (*id_to_piece)(const void* self, int id);
  bool (*is_control)(const void* self, int id);
  bool (*is_byte)(const void* self, int id);
  bool (*is_unknown)(const void* self, int id);
  int (*eos_id)(const void* self);
  std::string (*serialized)(const void* self);
  RawStatus (*train)(const std::unordered_map<std::string, std::string>& args, void* sentences,
                     std::string* model);
  void (*status_destroy)(void* status);
  const char* (*status_message)(const void* status);
};

// Opens libsentencepiece(_train) once per process; throws when it is not installed.
const SentencePieceApi& spm() {
  static const SentencePieceApi api = [] {
    const char* name = "libsentencepiece_train.so.0";  // loads libsentencepiece.so.0 with it
    void* lib = ::dlopen(name, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (lib == nullptr)
      throw std::runtime_error(fmt::format(
          "cannot load SentencePiece ({}); install the Debian package libsentencepiece0", ::dlerror()));
    auto find = [lib](auto& fn, const char* symbol) {
      void* p = ::dlsym(lib, symbol);
      if (p == nullptr) throw std::runtime_error(fmt::format("SentencePiece library lacks {}", symbol));
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
    };
    SentencePieceApi a{};
    find(a.construct, "_ZN13sentencepiece22SentencePieceProcessorC1Ev");
    find(a.destroy, "_ZN13sentencepiece22SentencePieceProcessorD1Ev");
    find(a.load,
         "_ZN13sentencepiece22SentencePieceProcessor23LoadFromSerializedProto"
         "ESt17basic_string_viewIcSt11char_traitsIcEE");
    find(a.encode,
         "_ZNK13sentencepiece22SentencePieceProcessor6Encode"
         "ESt17basic_string_viewIcSt11char_traitsIcEEPSt6vectorIiSaIiEE");
    find(a.decode,
         "_ZNK13sentencepiece22SentencePieceProcessor6Decode"
         "ERKSt6vectorIiSaIiEEPNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEE");
    find(a.piece_size, "_ZNK13sentencepiece22SentencePieceProcessor12GetPieceSizeEv");
    find(a.id_to_piece, "_ZNK13sentencepiece22SentencePieceProcessor9IdToPieceB5cxx11Ei");
    find(a.is_control, "_ZNK13sentencepiece22SentencePieceProcessor9IsControlEi");
    find(a.is_byte, "_ZNK13sentencepiece22SentencePieceProcessor6IsByteEi");
    find(a.is_unknown, "_ZNK13sentencepiece22SentencePieceProcessor9IsUnknownEi");
    find(a.eos_id, "_ZNK13sentencepiece22SentencePieceProcessor6eos_idEv");
    find(a.serialized, "_ZNK13sentencepiece22SentencePieceProcessor22serialized_model_protoB5cxx11Ev");
    find(a.train,
         "_ZN13sentencepiece20SentencePieceTrainer5Train"
         "ERKSt13unordered_mapINSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEES7_St4hashIS7_E"
         "St8equal_toIS7_ESaISt4pairIKS7_S7_EEEPNS_16SentenceIteratorEPS7_");
    find(a.status_destroy, "_ZN13sentencepiece4util6StatusD1Ev");
    find(a.status_message, "_ZNK13sentencepiece4util6Status13error_messageEv");
    return a;  // the library stays open for the life of the process
  }();
  return api;
}

RawStatus::~RawStatus() {
  if (rep != nullptr) spm().status_destroy(this);
}

// Messages look like "Internal: ./src/x.cc(660) [(a) == (b)] Vocabulary size too high (...)"; the part
// after the last "] " is the sentence meant for people.
std::string RawStatus::text() const {
  const char* raw = spm().status_message(this);
  std::string msg = raw == nullptr ? "" : raw;
  auto cut = msg.rfind("] ");
  if (cut != std::string::npos) msg = msg.substr(cut + 2);
  // A failed protobuf parse comes with no sentence at all.
  return msg.empty() ? "its bytes do not parse as a SentencePiece ModelProto (protobuf)" : msg;
}

// What io::check_sentencepiece_model finds wrong with a model's character maps; empty when nothing.
std::string charsmap_damage(const std::string& serialized, const std::string& what) {
  try {
    io::check_sentencepiece_model(serialized, what);
  } catch (const std::runtime_error& e) {
    return e.what();
  }
  return {};
}

// SentencePiece marks a word start with U+2581 (lower one eighth block); printed text wants a space.
constexpr std::string_view kWordMark = "\xE2\x96\x81";

class SentencePieceTokenizer final : public Tokenizer {
 public:
  // `what` names the model in errors (a path, or "serialized model").
  SentencePieceTokenizer(const std::string& serialized, const std::string& what) {
    spm().construct(sp_);
    std::string error;
    if (RawStatus status = spm().load(sp_, serialized); !status.ok()) {
      error = fmt::format("{}: not a SentencePiece model: {}", what, status.text());
    } else if (std::string damage = charsmap_damage(serialized, what); !damage.empty()) {
      error = damage;  // the library accepted it but would crash on the first encode
    } else if (spm().eos_id(sp_) < 0) {
      error = fmt::format(
          "{}: the SentencePiece model has no end-of-text (</s>) piece; train it with eos "
          "enabled (grape tokenizer train does)",
          what);
    }
    if (!error.empty()) {
      spm().destroy(sp_);  // the destructor does not run for a throwing constructor
      throw std::runtime_error(error);
    }
  }
  ~SentencePieceTokenizer() override { spm().destroy(sp_); }
  SentencePieceTokenizer(const SentencePieceTokenizer&) = delete;
  SentencePieceTokenizer& operator=(const SentencePieceTokenizer&) = delete;

  std::string kind() const override { return "sentencepiece"; }
  int64_t vocab_size() const override { return spm().piece_size(sp_); }
  int64_t eot() const override { return spm().eos_id(sp_); }

  std::vector<int32_t> encode(std::string_view text) const override {
    // Chunks that end at a newline: the encoder's cost and memory stay bounded on a 4 MB text, and a
    // newline is never inside a piece (training reads lines), so the ids equal one whole-text encode.
    constexpr size_t kChunk = 1 << 16;
    std::vector<int32_t> ids;
    std::vector<int> part;
    for (size_t pos = 0; pos < text.size();) {
      size_t end = text.size();
      if (end - pos > kChunk) {
        size_t nl = text.find('\n', pos + kChunk);
        end = nl == std::string_view::npos ? text.size() : nl + 1;
      }
      RawStatus status = spm().encode(sp_, text.substr(pos, end - pos), &part);
      if (!status.ok()) throw std::runtime_error("sentencepiece encode failed: " + status.text());
      ids.insert(ids.end(), part.begin(), part.end());
      pos = end;
    }
    return ids;
  }

  std::string decode(const std::vector<int32_t>& ids) const override {
    std::vector<int> kept;
    kept.reserve(ids.size());
    for (int32_t id : ids) {
      check_id(id);
      if (id != eot()) kept.push_back(id);
    }
    std::string out;
    RawStatus status = spm().decode(sp_, kept, &out);
    if (!status.ok()) throw std::runtime_error("sentencepiece decode failed: " + status.text());
    return out;
  }

  std::string piece(int32_t id) const override {
    check_id(id);
    if (spm().is_control(sp_, id)) return {};  // </s> and friends print as nothing
    const std::string& p = spm().id_to_piece(sp_, id);
    if (spm().is_byte(sp_, id))
      return std::string(1, static_cast<char>(std::stoi(p.substr(3, 2), nullptr, 16)));  // "<0xAB>"
    if (spm().is_unknown(sp_, id)) return "\xE2\x81\x87";  // U+2047, as SentencePiece decodes <unk>
    std::string out;
    for (size_t i = 0; i < p.size();) {
      if (p.compare(i, kWordMark.size(), kWordMark) == 0) {
        out += ' ';
        i += kWordMark.size();
      } else {
        out += p[i++];
      }
    }
    return out;
  }

  std::string model_bytes() const override { return spm().serialized(sp_); }

 private:
  void check_id(int32_t id) const {
    if (id < 0 || id >= vocab_size())
      throw std::out_of_range(fmt::format("sentencepiece: id {} is not in 0..{}", id, vocab_size() - 1));
  }
  // A sentencepiece::SentencePieceProcessor, built and destroyed by the library.
  alignas(
      sentencepiece::SentencePieceProcessor) unsigned char sp_[sizeof(sentencepiece::SentencePieceProcessor)];
};

}  // namespace

std::unique_ptr<Tokenizer> make_byte_tokenizer() { return std::make_unique<ByteTokenizer>(); }

std::unique_ptr<Tokenizer> load_sentencepiece(const std::string& model_path) {
  if (!std::filesystem::is_regular_file(model_path))
    throw std::runtime_error(
        fmt::format("tokenizer '{}': no such file (expected \"byte\" or a SentencePiece "
                    ".model file, e.g. from `grape tokenizer train`)",
                    model_path));
  return std::make_unique<SentencePieceTokenizer>(io::read_file(model_path), "'" + model_path + "'");
}

std::unique_ptr<Tokenizer> sentencepiece_from_bytes(const std::string& model_bytes) {
  if (model_bytes.empty()) throw std::runtime_error("serialized SentencePiece model: empty");
  return std::make_unique<SentencePieceTokenizer>(model_bytes, "serialized SentencePiece model");
}

std::unique_ptr<Tokenizer> make_id_tokenizer(int64_t vocab_size) {
  if (vocab_size < 2 || vocab_size > (int64_t(1) << 31))
    throw std::invalid_argument(fmt::format("tokenizer 'none': vocab_size {} is not in 2..2^31", vocab_size));
  return std::make_unique<IdTokenizer>(vocab_size);
}

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& spec) {
  if (spec == "byte") return make_byte_tokenizer();
  if (spec == "none")
    throw std::invalid_argument("tokenizer 'none' needs the vocabulary size (make_id_tokenizer)");
  if (is_bpe_spec(spec)) return load_bpe(spec);
  return load_sentencepiece(spec);
}

std::unique_ptr<Tokenizer> copy_tokenizer(const Tokenizer& tok) {
  if (tok.kind() == "byte") return make_byte_tokenizer();
  if (tok.kind() == "sentencepiece") return sentencepiece_from_bytes(tok.model_bytes());
  if (tok.kind() == "bpe") return bpe_from_bytes(tok.model_bytes());
  if (tok.kind() == "none") return make_id_tokenizer(tok.vocab_size());
  throw std::invalid_argument(fmt::format("tokenizer kind '{}' cannot be copied", tok.kind()));
}

void train_sentencepiece(const SentencePieceTraining& s) {
  if (s.inputs.empty()) throw std::invalid_argument("tokenizer training: no input files");
  if (s.out_path.empty()) throw std::invalid_argument("tokenizer training: no output path");
  if (s.model_type != "bpe" && s.model_type != "unigram")
    throw std::invalid_argument(
        fmt::format("tokenizer training: model type '{}' is not one of bpe|unigram", s.model_type));
  if (s.vocab_size < 2)
    throw std::invalid_argument(fmt::format("tokenizer training: vocab size {} < 2", s.vocab_size));
  if (s.max_sentences < 1)
    throw std::invalid_argument(fmt::format("tokenizer training: max sentences {} < 1", s.max_sentences));
  for (const auto& in : s.inputs)
    if (!std::filesystem::is_regular_file(in))
      throw std::runtime_error(fmt::format("tokenizer training: cannot read input '{}': no such file", in));

  // Identity normalization, kept whitespace and no dummy prefix make decode(encode(text)) == text, and
  // encoding pieces of a text separately gives the same ids as encoding it whole. byte_fallback: any
  // byte encodes, never <unk>. Ids: <unk> = 0, </s> = 1 (the end-of-text), no <s>.
  std::unordered_map<std::string, std::string> args = {
      {"input", fmt::format("{}", fmt::join(s.inputs, ","))},
      {"vocab_size", std::to_string(s.vocab_size)},
      {"model_type", s.model_type},
      {"input_sentence_size", std::to_string(s.max_sentences)},
      {"shuffle_input_sentence", "true"},
      {"max_sentence_length", "16384"},
      {"byte_fallback", "true"},
      {"character_coverage", "1.0"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "false"},
      {"unk_id", "0"},
      {"eos_id", "1"},
      {"bos_id", "-1"},
      {"pad_id", "-1"},
      {"num_threads", "2"},
      {"minloglevel", "2"},  // errors only: training logs pages of progress otherwise
  };
  // The model comes back serialized (no model_prefix files) and is written atomically.
  std::string model;
  RawStatus status = spm().train(args, nullptr, &model);
  if (!status.ok()) {
    std::string why = status.text();
    // Its advice names a flag grape does not have; say what the minimum is made of instead.
    if (auto cut = why.find(" Increase vocab_size"); cut != std::string::npos)
      why =
          why.substr(0, cut) + " (256 byte pieces, <unk>, </s> and every distinct character each take an id)";
    throw std::runtime_error(
        fmt::format("tokenizer training on {} failed: {}", fmt::join(s.inputs, ", "), why));
  }
  io::write_file_atomic(s.out_path, model);
}

}  // namespace grape::data
