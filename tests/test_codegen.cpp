// Suite "unit": the kernel generator's command line, as Meson uses it.
#include <doctest/doctest.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>

namespace {

struct Run {
  int status;
  std::string output;
};

Run generate(const std::string& args) {
  const char* root = std::getenv("SPARQ_SOURCE_ROOT");
  std::string cmd = std::string("python3 ") + (root ? root : ".") + "/codegen/generate.py " + args + " 2>&1";
  Run r{-1, {}};
  FILE* pipe = popen(cmd.c_str(), "r");
  if (!pipe) return r;
  std::array<char, 4096> buf;
  while (fgets(buf.data(), buf.size(), pipe)) r.output += buf.data();
  r.status = pclose(pipe);
  return r;
}

int count_lines(const std::string& s) {
  int n = 0;
  for (char c : s) n += c == '\n';
  return n;
}

}  // namespace

TEST_SUITE("unit") {

TEST_CASE("the generator lists more kernels for more head dims, each once, plus one registry") {
  if (!std::getenv("SPARQ_SOURCE_ROOT")) {
    MESSAGE("SPARQ_SOURCE_ROOT is not set (run through meson test); skipping generator checks");
    return;
  }
  for (const char* backend : {"cuda", "vulkan"}) {
    Run one = generate(std::string("--backend ") + backend + " --head-dims 64 --cuda-archs sm_89 --list");
    Run two = generate(std::string("--backend ") + backend + " --head-dims 64,128 --cuda-archs sm_89 --list");
    REQUIRE_MESSAGE(one.status == 0, one.output);
    REQUIRE_MESSAGE(two.status == 0, two.output);
    CHECK(one.output.find("sparq_registry_") != std::string::npos);
    CHECK(count_lines(two.output) >= count_lines(one.output));
  }
}

TEST_CASE("an unsupported head dim is an error naming the Meson option") {
  if (!std::getenv("SPARQ_SOURCE_ROOT")) return;
  Run r = generate("--backend vulkan --head-dims 65 --list");
  CHECK(r.status != 0);
  CHECK_MESSAGE(r.output.find("-Dhead_dims") != std::string::npos, r.output);
}

}  // TEST_SUITE
