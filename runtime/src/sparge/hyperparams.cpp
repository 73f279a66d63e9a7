// The SpargeAttn hyper-parameter file: versioned JSON, per layer and per head (docs/SPARGE.md).
// Loading is strict: every unknown, missing, duplicated, mistyped or out-of-range entry is an error that
// names the file and the JSON path of the entry.
#include "sparge_internal.hpp"

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>
#include <set>
#include <sstream>

namespace sparq {
namespace {

using Json = nlohmann::json;
constexpr const char* kFormat = "sparq-sparge-hyperparams";

[[noreturn]] void file_error(const std::string& source, const std::string& where, const std::string& message) {
  detail::fail(Status::InvalidArgument, source + ": " + (where.empty() ? "" : where + ": ") + message);
}

std::string json_quoted(const std::string& s) { return Json(s).dump(); }

std::string type_name(const Json& j) {
  if (j.is_number()) return "a number (" + j.dump() + ")";
  if (j.is_string()) return "a string (" + j.dump() + ")";
  if (j.is_boolean()) return std::string("a boolean (") + (j.get<bool>() ? "true" : "false") + ")";
  if (j.is_null()) return "null";
  if (j.is_array()) return "an array";
  return "an object";
}

void expect_keys(const Json& obj, const std::string& source, const std::string& where,
                 const std::set<std::string>& required, const std::set<std::string>& optional) {
  for (auto it = obj.begin(); it != obj.end(); ++it)
    if (!required.count(it.key()) && !optional.count(it.key())) {
      std::string known;
      for (const auto* set : {&required, &optional})
        for (const auto& k : *set) known += (known.empty() ? "" : ", ") + k;
      file_error(source, where, "unknown key " + json_quoted(it.key()) + " (expected " + known + ")");
    }
  for (const auto& k : required)
    if (!obj.contains(k)) file_error(source, where, "missing key " + json_quoted(k));
}

float number_in(const Json& j, const std::string& source, const std::string& where, double lo, double hi,
                const std::string& range) {
  if (!j.is_number()) file_error(source, where, "expected a number in " + range + ", got " + type_name(j));
  const double x = j.get<double>();
  if (!(x >= lo && x <= hi)) file_error(source, where, "expected a number in " + range + ", got " + j.dump());
  return static_cast<float>(x);
}

int block_size(const Json& j, const std::string& source, const std::string& where) {
  if (!j.is_number_integer() || j.get<int64_t>() < 0 || j.get<int64_t>() > (1 << 20))
    file_error(source, where, "expected a block size (an integer >= 0), got " + type_name(j));
  return static_cast<int>(j.get<int64_t>());
}

SpargeParams parse_head(const Json& j, const std::string& source, const std::string& where) {
  if (!j.is_object()) file_error(source, where, "expected an object, got " + type_name(j));
  expect_keys(j, source, where, {"simthreshd", "cdfthreshd", "topk", "pvthreshd", "dense"}, {});
  SpargeParams p;
  p.simthreshd = number_in(j["simthreshd"], source, where + ".simthreshd", 0.0, 1.0, "[0, 1]");
  p.cdfthreshd = number_in(j["cdfthreshd"], source, where + ".cdfthreshd", 0.0, 1.0, "[0, 1]");
  p.topk = number_in(j["topk"], source, where + ".topk", 0.0, 1.0, "[0, 1] (0 = use cdfthreshd)");
  const Json& pv = j["pvthreshd"];
  if (pv.is_null()) {
    p.pvthreshd = std::numeric_limits<float>::infinity();
  } else {
    p.pvthreshd = number_in(pv, source, where + ".pvthreshd", 0.0, 1e30, "[0, 1e30] or null (no stage 2)");
  }
  const Json& dense = j["dense"];
  if (!dense.is_boolean()) file_error(source, where + ".dense", "expected true or false, got " + type_name(dense));
  p.dense = dense.get<bool>();
  return p;
}

// Where in the text a byte offset is, as "line L, column C".
std::string position(const std::string& text, std::size_t byte) {
  std::size_t line = 1, col = 1;
  for (std::size_t i = 0; i < byte && i < text.size(); ++i) {
    if (text[i] == '\n') ++line, col = 1;
    else ++col;
  }
  return "line " + std::to_string(line) + ", column " + std::to_string(col);
}

std::string number_text(float x) {
  // shortest text that reads back as the same float
  for (int digits = 6; digits <= 9; ++digits) {
    std::ostringstream s;
    s.precision(digits);
    s << x;
    if (std::stof(s.str()) == x) return s.str();
  }
  return Json(static_cast<double>(x)).dump();
}

}  // namespace

void validate(const SpargeParams& p, const std::string& where) {
  auto check = [&](float x, const char* name, float lo, float hi, const char* range) {
    if (!(x >= lo && x <= hi))
      detail::fail(Status::InvalidArgument,
                   where + ": " + name + " is " + std::to_string(x) + ", expected a value in " + range);
  };
  check(p.simthreshd, "simthreshd", 0.0f, 1.0f, "[0, 1]");
  check(p.cdfthreshd, "cdfthreshd", 0.0f, 1.0f, "[0, 1]");
  check(p.topk, "topk", 0.0f, 1.0f, "[0, 1] (0 = use cdfthreshd)");
  if (!(p.pvthreshd >= 0.0f))
    detail::fail(Status::InvalidArgument, where + ": pvthreshd is " + std::to_string(p.pvthreshd) +
                                              ", expected a value >= 0 (+inf = no stage 2)");
}

HyperParams HyperParams::parse(const std::string& text, const std::string& source) {
  // Parse, rejecting duplicated keys (nlohmann would silently keep the last one).
  std::vector<std::set<std::string>> keys;
  std::string duplicate;
  auto callback = [&](int, Json::parse_event_t event, Json& parsed) {
    if (event == Json::parse_event_t::object_start) keys.emplace_back();
    else if (event == Json::parse_event_t::object_end) keys.pop_back();
    else if (event == Json::parse_event_t::key && !keys.empty() && duplicate.empty()) {
      const std::string k = parsed.get<std::string>();
      if (!keys.back().insert(k).second) duplicate = k;
    }
    return true;
  };
  Json root;
  try {
    root = Json::parse(text, callback);
  } catch (const Json::parse_error& e) {
    std::string what = e.what();
    // nlohmann's message: "[json.exception.parse_error.101] parse error at line 1, column 2: ..."
    const auto colon = what.find(": ");
    file_error(source, "", "invalid JSON at " + position(text, e.byte > 0 ? e.byte - 1 : 0) + " (" +
                               (colon == std::string::npos ? what : what.substr(colon + 2)) + ")");
  }
  if (!duplicate.empty()) file_error(source, "", "duplicated key " + json_quoted(duplicate));
  if (!root.is_object()) file_error(source, "", "expected a JSON object at the top level, got " + type_name(root));
  expect_keys(root, source, "", {"format", "version", "layers"}, {"block_q", "block_k"});
  if (!root["format"].is_string() || root["format"].get<std::string>() != kFormat)
    file_error(source, "format", std::string("expected \"") + kFormat + "\", got " + type_name(root["format"]));
  const Json& version = root["version"];
  if (!version.is_number_integer())
    file_error(source, "version", "expected an integer, got " + type_name(version));
  if (version.get<int64_t>() != kVersion)
    file_error(source, "version", "version " + version.dump() + " is not supported (this library reads version " +
                                      std::to_string(kVersion) + ")");
  HyperParams hp;
  if (root.contains("block_q")) hp.block_q = block_size(root["block_q"], source, "block_q");
  if (root.contains("block_k")) hp.block_k = block_size(root["block_k"], source, "block_k");
  const Json& layers = root["layers"];
  if (!layers.is_object()) file_error(source, "layers", "expected an object of layers, got " + type_name(layers));
  for (auto it = layers.begin(); it != layers.end(); ++it) {
    const std::string where = "layers." + json_quoted(it.key());
    if (it.key().empty()) file_error(source, where, "a layer name must not be empty");
    const Json& layer = it.value();
    if (!layer.is_object()) file_error(source, where, "expected an object with \"heads\", got " + type_name(layer));
    expect_keys(layer, source, where, {"heads"}, {});
    const Json& heads = layer["heads"];
    if (!heads.is_array()) file_error(source, where + ".heads", "expected an array of heads, got " + type_name(heads));
    if (heads.empty()) file_error(source, where + ".heads", "expected at least one head");
    std::vector<SpargeParams> params;
    for (std::size_t h = 0; h < heads.size(); ++h)
      params.push_back(parse_head(heads[h], source, where + ".heads[" + std::to_string(h) + "]"));
    hp.layers_[it.key()] = std::move(params);
  }
  return hp;
}

HyperParams HyperParams::load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::fail(Status::InvalidArgument, path + ": cannot open the hyper-parameter file");
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) detail::fail(Status::InvalidArgument, path + ": cannot read the hyper-parameter file");
  return parse(text.str(), path);
}

std::string HyperParams::to_json() const {
  // One head per line keeps files of many heads readable and diffable.
  std::ostringstream s;
  s << "{\n  \"format\": \"" << kFormat << "\",\n  \"version\": " << kVersion << ",\n";
  if (block_q > 0) s << "  \"block_q\": " << block_q << ",\n";
  if (block_k > 0) s << "  \"block_k\": " << block_k << ",\n";
  s << "  \"layers\": {";
  bool first_layer = true;
  for (const auto& [name, heads] : layers_) {
    s << (first_layer ? "\n" : ",\n") << "    " << json_quoted(name) << ": {\"heads\": [";
    first_layer = false;
    for (std::size_t h = 0; h < heads.size(); ++h) {
      const SpargeParams& p = heads[h];
      s << (h ? ",\n" : "\n") << "      {\"simthreshd\": " << number_text(p.simthreshd)
        << ", \"cdfthreshd\": " << number_text(p.cdfthreshd) << ", \"topk\": " << number_text(p.topk)
        << ", \"pvthreshd\": " << (p.stage2() ? number_text(p.pvthreshd) : std::string("null"))
        << ", \"dense\": " << (p.dense ? "true" : "false") << "}";
    }
    s << "\n    ]}";
  }
  s << (first_layer ? "}\n}\n" : "\n  }\n}\n");
  return s.str();
}

void HyperParams::save(const std::string& path) const {
  const std::string text = to_json();
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) detail::fail(Status::InvalidArgument, path + ": cannot open the hyper-parameter file for writing");
  out << text;
  out.flush();
  if (!out) detail::fail(Status::InvalidArgument, path + ": cannot write the hyper-parameter file");
}

const std::vector<SpargeParams>& HyperParams::layer(const std::string& name, int heads) const {
  auto it = layers_.find(name);
  if (it == layers_.end()) {
    std::string known;
    int listed = 0;
    for (const auto& [n, _] : layers_) {
      if (listed++ == 8) {
        known += ", ...";
        break;
      }
      known += (known.empty() ? "" : ", ") + json_quoted(n);
    }
    detail::fail(Status::InvalidArgument, "HyperParams: no layer " + json_quoted(name) +
                                              (known.empty() ? " (the file has no layers)" : " (layers: " + known + ")"));
  }
  if (heads > 0 && it->second.size() != static_cast<std::size_t>(heads))
    detail::fail(Status::InvalidArgument, "HyperParams: layer " + json_quoted(name) + " has " +
                                              std::to_string(it->second.size()) + " heads, expected " +
                                              std::to_string(heads));
  return it->second;
}

void HyperParams::set_layer(const std::string& name, std::vector<SpargeParams> heads) {
  if (name.empty()) detail::fail(Status::InvalidArgument, "HyperParams::set_layer: the layer name is empty");
  if (heads.empty()) detail::fail(Status::InvalidArgument, "HyperParams::set_layer: layer " + json_quoted(name) + " has no heads");
  for (std::size_t h = 0; h < heads.size(); ++h)
    validate(heads[h], "HyperParams::set_layer: layer " + json_quoted(name) + " head " + std::to_string(h));
  layers_[name] = std::move(heads);
}

std::vector<std::string> HyperParams::layer_names() const {
  std::vector<std::string> names;
  for (const auto& [n, _] : layers_) names.push_back(n);
  return names;
}

}  // namespace sparq
