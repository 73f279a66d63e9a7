// Suite "unit": the runtime's argument validation, tensors, contexts and the C API, on the reference backend.
// Every invalid argument must fail with InvalidArgument, name the argument, and leave the output untouched.
#include <doctest/doctest.h>
#include <sparq/sparq.h>
#include <sparq/sparq.hpp>

#include <cmath>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

using namespace sparq;

namespace {

struct Problem {
  Context ctx = Context::create(Backend::Reference);
  Tensor q, k, v, out;
  std::vector<uint16_t> sentinel;
  Problem(int64_t B = 1, int64_t Hq = 4, int64_t Hkv = 2, int64_t Nq = 33, int64_t Nk = 70, int64_t D = 64) {
    std::vector<uint16_t> ones(static_cast<size_t>(B * std::max(Hq, Hkv) * std::max(Nq, Nk) * D), 0x3C00);
    q = ctx.from_host(DType::F16, {B, Hq, Nq, D}, ones.data());
    k = ctx.from_host(DType::F16, {B, Hkv, Nk, D}, ones.data());
    v = ctx.from_host(DType::F16, {B, Hkv, Nk, D}, ones.data());
    sentinel.assign(static_cast<size_t>(B * Hq * Nq * D), 0x7BFF);
    out = ctx.from_host(DType::F16, {B, Hq, Nq, D}, sentinel.data());
  }
  bool out_untouched() {
    std::vector<uint16_t> now(sentinel.size());
    ctx.to_host(out, now.data());
    return now == sentinel;
  }
};

// Runs f, expects an Error with `status` whose message contains every word of `words`.
void expect_error(const std::function<void()>& f, Status status, std::vector<std::string> words) {
  try {
    f();
    FAIL("expected an error mentioning " << words.front());
  } catch (const Error& e) {
    CHECK_MESSAGE(e.status() == status, e.what());
    for (const auto& w : words) CHECK_MESSAGE(std::string(e.what()).find(w) != std::string::npos, e.what() << " lacks '" << w << "'");
  }
}

void expect_invalid(Problem& p, const std::function<void()>& f, std::vector<std::string> words) {
  expect_error(f, Status::InvalidArgument, std::move(words));
  CHECK(p.out_untouched());
}

}  // namespace

TEST_SUITE("unit") {

TEST_CASE("a valid call runs and writes the output") {
  Problem p;
  attention(p.ctx, p.q, p.k, p.v, p.out);
  CHECK_FALSE(p.out_untouched());
  std::vector<uint16_t> o(p.sentinel.size());
  p.ctx.to_host(p.out, o.data());
  CHECK(o[0] == 0x3C00);  // all-ones V gives exactly 1
}

TEST_CASE("shape and dtype errors name the argument") {
  Problem p;
  Tensor t3 = p.ctx.empty(DType::F16, {1, 4, 33});
  expect_invalid(p, [&] { attention(p.ctx, t3, p.k, p.v, p.out); }, {"q", "4 dimensions"});
  Tensor f32 = p.ctx.empty(DType::F32, {1, 4, 33, 64});
  expect_invalid(p, [&] { attention(p.ctx, f32, p.k, p.v, p.out); }, {"q", "f32", "f16 or bf16"});
  Tensor kb = p.ctx.empty(DType::BF16, {1, 2, 70, 64});
  expect_invalid(p, [&] { attention(p.ctx, p.q, kb, p.v, p.out); }, {"k", "bf16"});
  Tensor k3 = p.ctx.empty(DType::F16, {1, 3, 70, 64});
  Tensor v3 = p.ctx.empty(DType::F16, {1, 3, 70, 64});
  expect_invalid(p, [&] { attention(p.ctx, p.q, k3, v3, p.out); }, {"multiple", "Hq % Hkv"});
  Tensor kd = p.ctx.empty(DType::F16, {1, 2, 70, 32});
  expect_invalid(p, [&] { attention(p.ctx, p.q, kd, p.v, p.out); }, {"head_dim"});
  Tensor vshort = p.ctx.empty(DType::F16, {1, 2, 69, 64});
  expect_invalid(p, [&] { attention(p.ctx, p.q, p.k, vshort, p.out); }, {"v", "k's shape"});
  Tensor badout = p.ctx.empty(DType::F16, {1, 4, 32, 64});
  expect_invalid(p, [&] { attention(p.ctx, p.q, p.k, p.v, badout); }, {"out", "q's shape"});
  Tensor outf32 = p.ctx.empty(DType::F32, {1, 4, 33, 64});
  expect_invalid(p, [&] { attention(p.ctx, p.q, p.k, p.v, outf32); }, {"out", "f32"});
  Tensor big = p.ctx.empty(DType::F16, {1, 4, 2, 512});
  Tensor bigk = p.ctx.empty(DType::F16, {1, 2, 2, 512});
  Tensor bigo = p.ctx.empty(DType::F16, {1, 4, 2, 512});
  expect_error([&] { attention(p.ctx, big, bigk, bigk, bigo); }, Status::InvalidArgument, {"head_dim", "256"});
  Tensor empty;
  expect_invalid(p, [&] { attention(p.ctx, empty, p.k, p.v, p.out); }, {"q", "empty"});
}

TEST_CASE("strides: the head dim must be contiguous") {
  Problem p;
  Tensor wide = p.ctx.empty(DType::F16, {1, 4, 33, 128});
  Tensor strided = wide.view({1, 4, 33, 64}, {4 * 33 * 128, 33 * 128, 128, 2});
  expect_invalid(p, [&] { attention(p.ctx, strided, p.k, p.v, p.out); }, {"q", "contiguous"});
  expect_error([&] { (void)wide.view({1, 4, 34, 128}, {}); }, Status::InvalidArgument, {"view", "bytes"});
  expect_error([&] { (void)wide.view({1, 0, 3, 128}, {}); }, Status::InvalidArgument, {"view", "dimension"});
}

TEST_CASE("outputs must not alias inputs") {
  Problem p;
  Tensor alias = p.q;
  expect_error([&] { attention(p.ctx, p.q, p.k, p.v, alias); }, Status::InvalidArgument, {"out", "overlaps", "q"});
}

TEST_CASE("scale must be finite and positive") {
  Problem p;
  AttentionOptions o;
  o.scale = -1.0f;
  expect_invalid(p, [&] { attention(p.ctx, p.q, p.k, p.v, p.out, o); }, {"scale"});
  o.scale = std::nanf("");
  expect_invalid(p, [&] { attention(p.ctx, p.q, p.k, p.v, p.out, o); }, {"scale"});
  o.scale = INFINITY;
  expect_invalid(p, [&] { attention(p.ctx, p.q, p.k, p.v, p.out, o); }, {"scale"});
}

TEST_CASE("lse is checked") {
  Problem p;
  Tensor lse = p.ctx.empty(DType::F32, {1, 4, 32});
  expect_invalid(p, [&] { attention(p.ctx, p.q, p.k, p.v, p.out, {}, nullptr, &lse); }, {"lse", "[1, 4, 33]"});
  Tensor lse16 = p.ctx.empty(DType::F16, {1, 4, 33});
  expect_invalid(p, [&] { attention(p.ctx, p.q, p.k, p.v, p.out, {}, nullptr, &lse16); }, {"lse", "f32"});
}

TEST_CASE("block masks are checked") {
  Problem p;  // Nq = 33, Nk = 70
  auto g = p.ctx.mask_granularity();
  int bq = g[0], bk = g[1];
  int64_t nqb = (33 + bq - 1) / bq, nkb = (70 + bk - 1) / bk;
  std::vector<uint8_t> bits(static_cast<size_t>(4 * nqb * nkb), 1);
  Tensor bitmap = p.ctx.from_host(DType::U8, {1, 4, nqb, nkb}, bits.data());
  BlockMask ok = BlockMask::from_bitmap(bitmap, bq, bk);
  attention(p.ctx, p.q, p.k, p.v, p.out, {}, &ok);  // valid

  Problem p2;
  BlockMask odd = BlockMask::from_bitmap(bitmap, bq + 1, bk);
  expect_invalid(p2, [&] { attention(p2.ctx, p2.q, p2.k, p2.v, p2.out, {}, &odd); }, {"mask", "multiple", "tile"});
  BlockMask zero = BlockMask::from_bitmap(bitmap, 0, bk);
  expect_invalid(p2, [&] { attention(p2.ctx, p2.q, p2.k, p2.v, p2.out, {}, &zero); }, {"mask", "positive"});
  Tensor three_heads = p2.ctx.from_host(DType::U8, {1, 3, nqb, nkb}, bits.data());
  BlockMask heads = BlockMask::from_bitmap(three_heads, bq, bk);
  expect_invalid(p2, [&] { attention(p2.ctx, p2.q, p2.k, p2.v, p2.out, {}, &heads); }, {"bitmap", "3 heads"});
  Tensor wrong_blocks = p2.ctx.from_host(DType::U8, {1, 4, nqb + 1, nkb}, bits.data());
  BlockMask wb = BlockMask::from_bitmap(wrong_blocks, bq, bk);
  expect_invalid(p2, [&] { attention(p2.ctx, p2.q, p2.k, p2.v, p2.out, {}, &wb); }, {"bitmap", "nQB"});
  Tensor i32 = p2.ctx.empty(DType::I32, {1, 4, nqb, nkb});
  BlockMask wrong_type = BlockMask::from_bitmap(i32, bq, bk);
  expect_invalid(p2, [&] { attention(p2.ctx, p2.q, p2.k, p2.v, p2.out, {}, &wrong_type); }, {"bitmap", "i32", "u8"});
  Tensor counts = p2.ctx.empty(DType::I32, {1, 4, nqb});
  Tensor indices = p2.ctx.empty(DType::I32, {1, 4, nqb, nkb + 2});
  BlockMask lut = BlockMask::from_lut(counts, indices, bq, bk);
  expect_invalid(p2, [&] { attention(p2.ctx, p2.q, p2.k, p2.v, p2.out, {}, &lut); }, {"indices", "nKB"});
}

TEST_CASE("tensors from another context are rejected") {
  Problem p, other;
  expect_invalid(p, [&] { attention(p.ctx, other.q, p.k, p.v, p.out); }, {"q", "another context"});
}

TEST_CASE("host copies round-trip through strided views") {
  Context ctx = Context::create(Backend::Reference);
  std::vector<float> data(2 * 3 * 4);
  for (size_t i = 0; i < data.size(); ++i) data[i] = float(i);
  Tensor t = ctx.from_host(DType::F32, {2, 3, 4}, data.data());
  Tensor tr = t.view({2, 4, 3}, {12, 1, 4});  // a transposed view
  std::vector<float> got(24);
  ctx.to_host(tr, got.data());
  CHECK(got[1] == data[4]);
  CHECK(got[3] == data[1]);
  std::vector<float> back(24, -1.0f);
  Tensor u = ctx.from_host(DType::F32, {2, 3, 4}, back.data());
  ctx.from_host(u.view({2, 4, 3}, {12, 1, 4}), got.data());
  ctx.to_host(u, back.data());
  CHECK(back == data);
}

TEST_CASE("unavailable backends say why") {
  // Whether CUDA or Vulkan exists depends on the machine; if creation fails it must be BackendUnavailable.
  for (Backend b : {Backend::Cuda, Backend::Vulkan}) {
    try {
      Context c = Context::create(b);
      CHECK(c.backend() == b);
    } catch (const Error& e) {
      CHECK_MESSAGE(e.status() == Status::BackendUnavailable, e.what());
      CHECK(std::string(e.what()).size() > 10);
    }
  }
  Context a = Context::create(Backend::Auto);
  MESSAGE("Auto picked " << std::string(to_string(a.backend())) << ": " << a.device_name());
}

TEST_CASE("the C API reports status codes and a thread-local last error") {
  sparq_context ctx = nullptr;
  REQUIRE(sparq_context_create(SPARQ_BACKEND_REFERENCE, -1, &ctx) == SPARQ_OK);
  int64_t qs[4] = {1, 2, 17, 64}, ks[4] = {1, 1, 9, 64};
  sparq_tensor q, k, v, out, lse;
  REQUIRE(sparq_tensor_create(ctx, SPARQ_F16, 4, qs, &q) == SPARQ_OK);
  REQUIRE(sparq_tensor_create(ctx, SPARQ_F16, 4, ks, &k) == SPARQ_OK);
  REQUIRE(sparq_tensor_create(ctx, SPARQ_F16, 4, ks, &v) == SPARQ_OK);
  REQUIRE(sparq_tensor_create(ctx, SPARQ_F16, 4, qs, &out) == SPARQ_OK);
  int64_t ls[3] = {1, 2, 17};
  REQUIRE(sparq_tensor_create(ctx, SPARQ_F32, 3, ls, &lse) == SPARQ_OK);
  std::vector<uint16_t> ones(2 * 17 * 64, 0x3C00);
  REQUIRE(sparq_tensor_upload(ctx, q, ones.data()) == SPARQ_OK);
  REQUIRE(sparq_tensor_upload(ctx, k, ones.data()) == SPARQ_OK);
  REQUIRE(sparq_tensor_upload(ctx, v, ones.data()) == SPARQ_OK);
  sparq_attention_options o = sparq_default_options();
  o.causal = 1;
  CHECK(sparq_attention(ctx, q, k, v, out, &o, nullptr, lse) == SPARQ_OK);
  std::vector<float> l(2 * 17);
  REQUIRE(sparq_tensor_download(ctx, lse, l.data()) == SPARQ_OK);
  // Causal bottom-right with Nq=17 > Nk=9: query 0..7 see nothing, query 8 sees key 0.
  CHECK(std::isinf(l[0]));
  CHECK(l[0] < 0);
  CHECK(l[8] == doctest::Approx(1.0 * 64 / 8.0).epsilon(0.02));  // one key: lse = logit = scale·q·k = 64/sqrt(64)

  CHECK(sparq_attention(ctx, q, k, v, q, &o, nullptr, nullptr) == SPARQ_INVALID_ARGUMENT);
  CHECK(std::string(sparq_last_error()).find("overlaps") != std::string::npos);
  CHECK(sparq_attention(ctx, nullptr, k, v, out, nullptr, nullptr, nullptr) == SPARQ_INVALID_ARGUMENT);
  CHECK(std::string(sparq_last_error()).find("q is NULL") != std::string::npos);
  o.layout = static_cast<sparq_layout>(7);
  CHECK(sparq_attention(ctx, q, k, v, out, &o, nullptr, nullptr) == SPARQ_INVALID_ARGUMENT);
  int64_t bad_shape[2] = {2, -1};
  sparq_tensor t = nullptr;
  CHECK(sparq_tensor_create(ctx, SPARQ_F16, 2, bad_shape, &t) == SPARQ_INVALID_ARGUMENT);
  CHECK(t == nullptr);
  CHECK(sparq_tensor_create(ctx, SPARQ_F16, 9, bad_shape, &t) == SPARQ_INVALID_ARGUMENT);
  sparq_context bad_ctx = nullptr;
  CHECK(sparq_context_create(static_cast<sparq_backend>(42), -1, &bad_ctx) == SPARQ_INVALID_ARGUMENT);
  CHECK(bad_ctx == nullptr);
  char name[8];
  sparq_context ok = nullptr;
  REQUIRE(sparq_context_create(SPARQ_BACKEND_REFERENCE, -1, &ok) == SPARQ_OK);
  CHECK(sparq_context_device_name(ok, name, sizeof name) == SPARQ_OK);
  CHECK(std::strlen(name) <= 7);
  CHECK(std::string(sparq_status_string(SPARQ_NOT_SUPPORTED)) == "not supported");
  for (sparq_tensor x : {q, k, v, out, lse}) sparq_tensor_destroy(x);
  sparq_context_destroy(ok);
  sparq_context_destroy(ctx);
}

TEST_CASE("the C API runs SpargeAttn and loads hyper-parameter files") {
  sparq_context ctx = nullptr;
  REQUIRE(sparq_context_create(SPARQ_BACKEND_REFERENCE, -1, &ctx) == SPARQ_OK);
  int64_t shape[4] = {1, 2, 256, 64};
  sparq_tensor t[4];
  for (auto& x : t) REQUIRE(sparq_tensor_create(ctx, SPARQ_F16, 4, shape, &x) == SPARQ_OK);
  std::vector<uint16_t> data(2 * 256 * 64);
  for (size_t i = 0; i < data.size(); ++i) data[i] = static_cast<uint16_t>(0x3000 + (i * 2654435761u >> 22) % 0x800);
  for (int i = 0; i < 3; ++i) REQUIRE(sparq_tensor_upload(ctx, t[i], data.data()) == SPARQ_OK);
  sparq_sparge_params p = sparq_default_sparge_params();
  sparq_sparge_options o = sparq_default_sparge_options();
  sparq_sparge_stats stats{-1, -1};
  CHECK(sparq_sparge_attention(ctx, t[0], t[1], t[2], t[3], &o, &p, 1, &stats) == SPARQ_OK);
  CHECK(stats.block_sparsity >= 0);
  CHECK(sparq_sparge_attention(ctx, t[0], t[1], t[2], t[3], &o, &p, 0, nullptr) == SPARQ_INVALID_ARGUMENT);
  p.cdfthreshd = 2.0f;
  CHECK(sparq_sparge_attention(ctx, t[0], t[1], t[2], t[3], &o, &p, 1, nullptr) == SPARQ_INVALID_ARGUMENT);
  CHECK(std::string(sparq_last_error()).find("cdfthreshd") != std::string::npos);
  sparq_hyperparams hp = nullptr;
  CHECK(sparq_hyperparams_load("/nonexistent/sparge.json", &hp) == SPARQ_INVALID_ARGUMENT);
  CHECK(hp == nullptr);
  CHECK(std::string(sparq_last_error()).find("/nonexistent/sparge.json") != std::string::npos);
  for (auto& x : t) sparq_tensor_destroy(x);
  sparq_context_destroy(ctx);
}

}  // TEST_SUITE
