// sparq: command-line tools. `sparq tune` finds SpargeAttn hyper-parameters from captured q/k/v tensors and
// writes the JSON hyper-parameter file (docs/SPARGE.md describes the inputs and the file).
#include <sparq/sparge.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

namespace fs = std::filesystem;

namespace {

struct Usage : std::runtime_error {
  using std::runtime_error::runtime_error;
};

const char* kUsage =
    "usage: sparq tune [options] [INPUT ...]\n"
    "\n"
    "Finds per-head SpargeAttn parameters (simthreshd, cdfthreshd or topk, pvthreshd) whose output stays within\n"
    "relative-L1 bounds of exact attention on every captured sample, and writes the hyper-parameter file.\n"
    "\n"
    "inputs (see docs/SPARGE.md):\n"
    "  LAYER.q.npy LAYER.k.npy LAYER.v.npy   one sample of layer LAYER (LAYER@ID.q.npy: sample ID of LAYER)\n"
    "  FILE.safetensors                       tensors q, k, v (layer = file stem) or L.q, L.k, L.v per layer L\n"
    "  --layers DIR                           every .npy and .safetensors file in DIR\n"
    "  shapes [B, H, N, D] or [H, N, D]; f16, bf16 (safetensors) or f32\n"
    "\n"
    "options:\n"
    "  --out FILE        the hyper-parameter file to write (default sparge_hyperparams.json)\n"
    "  --l1 X            stage-1 bound, relative L1 against exact attention (default 0.05)\n"
    "  --pv-l1 X         bound with the stage-2 P·V skip too, >= l1; 0 disables stage 2 (default 0.06)\n"
    "  --topk            search a top-k fraction instead of cdfthreshd\n"
    "  --block-q N       query block size (default 128)\n"
    "  --block-k N       key block size (default 64)\n"
    "  --causal          causal attention (bottom-right aligned)\n"
    "  --scale X         softmax scale (default 1/sqrt(D))\n"
    "  --sink            always compute the first key block\n"
    "  --no-diagonal     do not force the diagonal blocks\n"
    "  --layout hnd|nhd  layout of 4-D inputs (default hnd: [B, H, N, D])\n"
    "  --backend NAME    auto, reference, cuda or vulkan: checks the block sizes against its kernel tile and,\n"
    "                    with --verify, runs sparge_attention on it (default reference)\n"
    "  --verify          after tuning, run sparge_attention on each layer's first sample and report the error\n"
    "                    against dense attention on the same backend and the measured sparsity\n"
    "  -h, --help        this text\n";

// ---- input files ------------------------------------------------------------------------------------------

struct Array {
  std::vector<int64_t> shape;
  std::vector<float> data;
};

float half_bits_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13);
  } else if (exp == 0) {
    const float v = static_cast<float>(man) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  } else {
    bits = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

float bf16_bits_to_float(uint16_t b) {
  const uint32_t bits = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Raw little-endian elements -> floats. kind: "f16", "bf16", "f32".
std::vector<float> decode(const char* src, std::size_t count, const std::string& kind) {
  std::vector<float> out(count);
  for (std::size_t i = 0; i < count; ++i) {
    if (kind == "f32") {
      std::memcpy(&out[i], src + 4 * i, 4);
    } else {
      uint16_t b;
      std::memcpy(&b, src + 2 * i, 2);
      out[i] = kind == "f16" ? half_bits_to_float(b) : bf16_bits_to_float(b);
    }
  }
  return out;
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path.string() + ": cannot open");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return bytes;
}

std::size_t element_count(const std::vector<int64_t>& shape, const std::string& where) {
  std::size_t n = 1;
  for (int64_t d : shape) {
    if (d < 0 || d > (int64_t{1} << 40)) throw std::runtime_error(where + ": bad dimension " + std::to_string(d));
    n *= static_cast<std::size_t>(d);
  }
  return n;
}

// A NumPy .npy file (format 1.0, 2.0 or 3.0): little-endian f2 / f4, C order.
Array read_npy(const fs::path& path) {
  const std::string where = path.string();
  const std::string bytes = read_file(path);
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) throw std::runtime_error(where + ": not a .npy file");
  const int major = static_cast<unsigned char>(bytes[6]);
  std::size_t header_len, header_start;
  if (major == 1) {
    header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<std::size_t>(static_cast<unsigned char>(bytes[9])) << 8);
    header_start = 10;
  } else if (major == 2 || major == 3) {
    if (bytes.size() < 12) throw std::runtime_error(where + ": truncated .npy header");
    header_len = 0;
    for (int i = 0; i < 4; ++i) header_len |= static_cast<std::size_t>(static_cast<unsigned char>(bytes[8 + i])) << (8 * i);
    header_start = 12;
  } else {
    throw std::runtime_error(where + ": unsupported .npy version " + std::to_string(major));
  }
  if (header_start + header_len > bytes.size()) throw std::runtime_error(where + ": truncated .npy header");
  const std::string header = bytes.substr(header_start, header_len);
  auto value_of = [&](const std::string& key) {
    const auto k = header.find("'" + key + "'");
    if (k == std::string::npos) throw std::runtime_error(where + ": .npy header has no '" + key + "'");
    const auto colon = header.find(':', k);
    if (colon == std::string::npos) throw std::runtime_error(where + ": malformed .npy header");
    std::size_t b = colon + 1;
    while (b < header.size() && header[b] == ' ') ++b;
    return b;
  };
  std::size_t d = value_of("descr");
  const char quote = header[d];
  const std::size_t d_end = header.find(quote, d + 1);
  const std::string descr = header.substr(d + 1, d_end - d - 1);
  std::string kind;
  if (descr == "<f2" || descr == "f2") kind = "f16";
  else if (descr == "<f4" || descr == "f4") kind = "f32";
  else throw std::runtime_error(where + ": dtype '" + descr + "' is not supported (expected little-endian float16 or float32)");
  std::size_t f = value_of("fortran_order");
  if (header.compare(f, 4, "True") == 0) throw std::runtime_error(where + ": Fortran-order arrays are not supported");
  std::size_t s = value_of("shape");
  const std::size_t s_end = header.find(')', s);
  if (header[s] != '(' || s_end == std::string::npos) throw std::runtime_error(where + ": malformed shape");
  Array a;
  std::string dims = header.substr(s + 1, s_end - s - 1);
  std::size_t pos = 0;
  while (pos < dims.size()) {
    while (pos < dims.size() && (dims[pos] == ' ' || dims[pos] == ',')) ++pos;
    if (pos >= dims.size()) break;
    std::size_t used = 0;
    a.shape.push_back(std::stoll(dims.substr(pos), &used));
    pos += used;
  }
  const std::size_t count = element_count(a.shape, where);
  const std::size_t data_start = header_start + header_len;
  const std::size_t elem = kind == "f32" ? 4 : 2;
  if (bytes.size() - data_start < count * elem)
    throw std::runtime_error(where + ": the data is shorter than the shape " + std::to_string(count) + " elements");
  a.data = decode(bytes.data() + data_start, count, kind);
  return a;
}

// A safetensors file: every F16 / BF16 / F32 tensor by name.
std::map<std::string, Array> read_safetensors(const fs::path& path) {
  const std::string where = path.string();
  const std::string bytes = read_file(path);
  if (bytes.size() < 8) throw std::runtime_error(where + ": not a safetensors file (too short)");
  uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= static_cast<uint64_t>(static_cast<unsigned char>(bytes[i])) << (8 * i);
  if (n > bytes.size() - 8) throw std::runtime_error(where + ": safetensors header size exceeds the file");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.substr(8, n));
  } catch (const std::exception& e) {
    throw std::runtime_error(where + ": bad safetensors header: " + e.what());
  }
  const std::size_t data_start = 8 + n;
  std::map<std::string, Array> out;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const auto& t = it.value();
    const std::string name = where + ": tensor \"" + it.key() + "\"";
    const std::string dtype = t.at("dtype").get<std::string>();
    std::string kind;
    if (dtype == "F16") kind = "f16";
    else if (dtype == "BF16") kind = "bf16";
    else if (dtype == "F32") kind = "f32";
    else continue;  // other tensors are not ours
    Array a;
    a.shape = t.at("shape").get<std::vector<int64_t>>();
    const auto off = t.at("data_offsets").get<std::vector<uint64_t>>();
    const std::size_t count = element_count(a.shape, name);
    const std::size_t elem = kind == "f32" ? 4 : 2;
    if (off.size() != 2 || off[1] < off[0] || off[1] - off[0] != count * elem || off[1] > bytes.size() - data_start)
      throw std::runtime_error(name + ": data_offsets do not match its shape and dtype");
    a.data = decode(bytes.data() + data_start + off[0], count, kind);
    out[it.key()] = std::move(a);
  }
  return out;
}

struct Triple {
  Array q, k, v;
  std::string origin;
};

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  return s;
}

// layer -> samples
void collect(const std::vector<fs::path>& inputs, std::map<std::string, std::vector<Triple>>& layers) {
  // .npy triples: LAYER[@ID].{q,k,v}.npy
  std::map<std::string, std::map<char, fs::path>> npy;  // stem (LAYER[@ID]) -> role -> file
  for (const fs::path& p : inputs) {
    if (!fs::is_regular_file(p)) throw std::runtime_error(p.string() + ": no such file");
    const std::string name = p.filename().string();
    const std::string ext = lower(p.extension().string());
    if (ext == ".safetensors") {
      auto tensors = read_safetensors(p);
      std::map<std::string, Triple> found;
      for (auto& [tname, arr] : tensors) {
        std::string layer = p.stem().string();
        std::string role = tname;
        const auto dot = tname.rfind('.');
        if (dot != std::string::npos) {
          layer = tname.substr(0, dot);
          role = tname.substr(dot + 1);
        }
        Triple& t = found[layer];
        t.origin = p.string();
        if (role == "q") t.q = std::move(arr);
        else if (role == "k") t.k = std::move(arr);
        else if (role == "v") t.v = std::move(arr);
      }
      for (auto& [layer, t] : found) {
        if (t.q.data.empty() && t.k.data.empty() && t.v.data.empty()) continue;
        if (t.q.data.empty() || t.k.data.empty() || t.v.data.empty())
          throw std::runtime_error(p.string() + ": layer \"" + layer + "\" lacks one of q, k, v");
        layers[layer].push_back(std::move(t));
      }
    } else if (ext == ".npy") {
      const std::string base = name.substr(0, name.size() - 4);
      if (base.size() < 3 || base[base.size() - 2] != '.' || std::string("qkv").find(base.back()) == std::string::npos)
        throw std::runtime_error(p.string() + ": .npy inputs must be named LAYER.q.npy, LAYER.k.npy, LAYER.v.npy");
      npy[(p.parent_path() / base.substr(0, base.size() - 2)).string()][base.back()] = p;
    } else {
      throw std::runtime_error(p.string() + ": expected a .npy or .safetensors file");
    }
  }
  for (auto& [stem, roles] : npy) {
    for (char r : {'q', 'k', 'v'})
      if (!roles.count(r)) throw std::runtime_error(stem + "." + r + ".npy is missing (needed with " + roles.begin()->second.string() + ")");
    std::string layer = fs::path(stem).filename().string();
    const auto at = layer.rfind('@');
    if (at != std::string::npos && at > 0) layer = layer.substr(0, at);
    Triple t;
    t.origin = stem;
    t.q = read_npy(roles['q']);
    t.k = read_npy(roles['k']);
    t.v = read_npy(roles['v']);
    layers[layer].push_back(std::move(t));
  }
}

// [B,H,N,D] / [H,N,D] (layout hnd) or [B,N,H,D] (nhd) -> HND sizes and data.
struct Dims {
  int b, h, n, d;
};
Dims to_hnd(Array& a, bool nhd, const std::string& what) {
  if (a.shape.size() == 3) a.shape.insert(a.shape.begin(), 1);
  if (a.shape.size() != 4)
    throw std::runtime_error(what + ": expected shape [B, H, N, D] or [H, N, D], got " + std::to_string(a.shape.size()) + " dimensions");
  for (int64_t s : a.shape)
    if (s <= 0 || s > (int64_t{1} << 30)) throw std::runtime_error(what + ": bad shape");
  Dims d{static_cast<int>(a.shape[0]), static_cast<int>(nhd ? a.shape[2] : a.shape[1]),
         static_cast<int>(nhd ? a.shape[1] : a.shape[2]), static_cast<int>(a.shape[3])};
  if (nhd) {
    std::vector<float> t(a.data.size());
    for (int b = 0; b < d.b; ++b)
      for (int n = 0; n < d.n; ++n)
        for (int h = 0; h < d.h; ++h)
          std::copy_n(a.data.begin() + ((static_cast<std::size_t>(b) * d.n + n) * d.h + h) * d.d, d.d,
                      t.begin() + ((static_cast<std::size_t>(b) * d.h + h) * d.n + n) * d.d);
    a.data = std::move(t);
  }
  return d;
}

double parse_number(const std::string& flag, const std::string& v) {
  try {
    std::size_t used = 0;
    const double x = std::stod(v, &used);
    if (used != v.size() || !std::isfinite(x)) throw std::invalid_argument(v);
    return x;
  } catch (const std::exception&) {
    throw Usage(flag + ": expected a number, got \"" + v + "\"");
  }
}

uint16_t float_to_half_bits(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);
  if (ax >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);
  if (ax < 0x38800000u) {
    float a;
    std::memcpy(&a, &ax, 4);
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * 16777216.0f)));
  }
  const uint32_t r = (ax + 0xFFFu + ((ax >> 13) & 1u)) >> 13;
  return static_cast<uint16_t>(sign | (r - (112u << 10)));
}

int tune(int argc, char** argv) {
  std::vector<fs::path> inputs;
  std::string out_path = "sparge_hyperparams.json", backend_name = "reference";
  sparq::SpargeOptions options;
  sparq::TunerOptions topt;
  bool nhd = false, verify = false;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw Usage(a + " needs a value");
      return argv[++i];
    };
    if (a == "-h" || a == "--help") {
      std::cout << kUsage;
      return 0;
    } else if (a == "--layers") {
      const fs::path dir = value();
      if (!fs::is_directory(dir)) throw Usage("--layers " + dir.string() + ": not a directory");
      std::vector<fs::path> found;
      for (const auto& e : fs::directory_iterator(dir)) {
        const std::string ext = lower(e.path().extension().string());
        if (e.is_regular_file() && (ext == ".npy" || ext == ".safetensors")) found.push_back(e.path());
      }
      std::sort(found.begin(), found.end());
      if (found.empty()) throw Usage("--layers " + dir.string() + ": no .npy or .safetensors files");
      inputs.insert(inputs.end(), found.begin(), found.end());
    } else if (a == "--out") {
      out_path = value();
    } else if (a == "--l1") {
      topt.l1 = parse_number(a, value());
    } else if (a == "--pv-l1") {
      topt.pv_l1 = parse_number(a, value());
    } else if (a == "--topk") {
      topt.use_topk = true;
    } else if (a == "--block-q") {
      options.block_q = static_cast<int>(parse_number(a, value()));
    } else if (a == "--block-k") {
      options.block_k = static_cast<int>(parse_number(a, value()));
    } else if (a == "--causal") {
      options.attention.causal = true;
    } else if (a == "--scale") {
      options.attention.scale = static_cast<float>(parse_number(a, value()));
    } else if (a == "--sink") {
      options.attention_sink = true;
    } else if (a == "--no-diagonal") {
      options.diagonal = false;
    } else if (a == "--layout") {
      const std::string v = lower(value());
      if (v != "hnd" && v != "nhd") throw Usage("--layout: expected hnd or nhd, got \"" + v + "\"");
      nhd = v == "nhd";
    } else if (a == "--backend") {
      backend_name = lower(value());
    } else if (a == "--verify") {
      verify = true;
    } else if (!a.empty() && a[0] == '-') {
      throw Usage("unknown option " + a);
    } else {
      inputs.push_back(a);
    }
  }
  if (inputs.empty()) throw Usage("no inputs (give .npy/.safetensors files or --layers DIR)");
  sparq::Backend backend;
  if (backend_name == "auto") backend = sparq::Backend::Auto;
  else if (backend_name == "reference") backend = sparq::Backend::Reference;
  else if (backend_name == "cuda") backend = sparq::Backend::Cuda;
  else if (backend_name == "vulkan") backend = sparq::Backend::Vulkan;
  else throw Usage("--backend: expected auto, reference, cuda or vulkan, got \"" + backend_name + "\"");
  sparq::Context ctx = sparq::Context::create(backend);
  const auto gran = ctx.mask_granularity();
  if (options.block_q <= 0 || options.block_k <= 0 || options.block_q % gran[0] || options.block_k % gran[1] ||
      options.block_k % 64 || options.block_q % 16)
    throw Usage("--block-q/--block-k " + std::to_string(options.block_q) + "x" + std::to_string(options.block_k) +
                " must be multiples of the " + ctx.device_name() + " tile " + std::to_string(gran[0]) + "x" +
                std::to_string(gran[1]) + " (and of 16x64)");

  std::map<std::string, std::vector<Triple>> layers;
  collect(inputs, layers);
  topt.progress = [](const std::string& line) { std::cout << "  " << line << std::endl; };
  sparq::Tuner tuner(options, topt);
  std::map<std::string, Triple> first;
  for (auto& [layer, samples] : layers) {
    for (Triple& t : samples) {
      Dims dq = to_hnd(t.q, nhd, t.origin + " q"), dk = to_hnd(t.k, nhd, t.origin + " k"),
           dv = to_hnd(t.v, nhd, t.origin + " v");
      if (dk.b != dq.b || dk.d != dq.d || dv.b != dk.b || dv.h != dk.h || dv.n != dk.n || dv.d != dk.d)
        throw std::runtime_error(t.origin + ": q, k, v shapes do not match (q [" + std::to_string(dq.b) + "," +
                                 std::to_string(dq.h) + "," + std::to_string(dq.n) + "," + std::to_string(dq.d) +
                                 "], k [" + std::to_string(dk.b) + "," + std::to_string(dk.h) + "," +
                                 std::to_string(dk.n) + "," + std::to_string(dk.d) + "])");
      tuner.observe_host(layer, dq.b, dq.h, dk.h, dq.n, dk.n, dq.d, t.q.data.data(), t.k.data.data(), t.v.data.data());
    }
    first[layer] = samples.front();
    samples.clear();
  }
  std::cout << "sparq tune: " << layers.size() << " layer(s), l1 " << topt.l1 << ", pv_l1 " << topt.pv_l1 << ", blocks "
            << options.block_q << "x" << options.block_k << std::endl;
  sparq::HyperParams hp;
  hp.block_q = options.block_q;
  hp.block_k = options.block_k;
  const auto start = std::chrono::steady_clock::now();
  for (const std::string& layer : tuner.layers()) {
    std::cout << "layer " << layer << ":" << std::endl;
    const auto t0 = std::chrono::steady_clock::now();
    std::vector<sparq::SpargeParams> params = tuner.tune_layer(layer);
    hp.set_layer(layer, params);
    std::cout << "layer " << layer << " done in "
              << std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() << " s" << std::endl;
    if (verify) try {
      Triple& t = first[layer];
      const Dims dq{static_cast<int>(t.q.shape[0]), static_cast<int>(t.q.shape[1]), static_cast<int>(t.q.shape[2]),
                    static_cast<int>(t.q.shape[3])};
      const Dims dk{static_cast<int>(t.k.shape[0]), static_cast<int>(t.k.shape[1]), static_cast<int>(t.k.shape[2]),
                    static_cast<int>(t.k.shape[3])};
      auto half = [](const std::vector<float>& x) {
        std::vector<uint16_t> h(x.size());
        for (std::size_t i = 0; i < x.size(); ++i) h[i] = float_to_half_bits(x[i]);
        return h;
      };
      auto hq = half(t.q.data), hk = half(t.k.data), hv = half(t.v.data);
      sparq::Tensor q = ctx.from_host(sparq::DType::F16, {dq.b, dq.h, dq.n, dq.d}, hq.data());
      sparq::Tensor k = ctx.from_host(sparq::DType::F16, {dk.b, dk.h, dk.n, dk.d}, hk.data());
      sparq::Tensor v = ctx.from_host(sparq::DType::F16, {dk.b, dk.h, dk.n, dk.d}, hv.data());
      sparq::Tensor dense = ctx.empty(sparq::DType::F16, {dq.b, dq.h, dq.n, dq.d});
      sparq::Tensor sparse = ctx.empty(sparq::DType::F16, {dq.b, dq.h, dq.n, dq.d});
      sparq::attention(ctx, q, k, v, dense, options.attention);
      sparq::SpargeStats stats;
      sparq::sparge_attention(ctx, q, k, v, sparse, options, params, &stats);
      std::vector<uint16_t> a(hq.size()), b(hq.size());
      ctx.to_host(dense, a.data());
      ctx.to_host(sparse, b.data());
      double num = 0, den = 0;
      for (std::size_t i = 0; i < a.size(); ++i) {
        const double x = half_bits_to_float(a[i]), y = half_bits_to_float(b[i]);
        num += std::fabs(x - y);
        den += std::fabs(x);
      }
      std::cout << "  verify on " << ctx.device_name() << ": block sparsity " << stats.block_sparsity
                << ", pv skip " << stats.pv_skip_fraction << ", rel L1 vs dense " << (den > 0 ? num / den : 0.0)
                << std::endl;
    } catch (const sparq::Error& e) {
      std::cout << "  verify on " << ctx.device_name() << " not possible: " << e.what() << std::endl;
    }
  }
  hp.save(out_path);
  std::cout << "wrote " << out_path << " ("
            << std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() << " s)" << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 2) {
      std::cerr << kUsage;
      return 2;
    }
    if (std::string(argv[1]) == "-h" || std::string(argv[1]) == "--help") {
      std::cout << kUsage;
      return 0;
    }
    if (std::string(argv[1]) == "tune") return tune(argc, argv);
    throw Usage(std::string("unknown command \"") + argv[1] + "\"");
  } catch (const Usage& e) {
    std::cerr << "sparq: " << e.what() << "\n\n" << kUsage;
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "sparq: error: " << e.what() << "\n";
    return 1;
  }
}
