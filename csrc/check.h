// PARADEC_CHECK(cond, parts...): TORCH_CHECK with the message built here, as one std::string,
// from strings and numbers. Several-argument TORCH_CHECK messages crashed (segfault) the
// extension built against torch 2.11+cu130 with g++ 13 on the GPU machines; one string passes.
#pragma once

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <string>

namespace paradec {

inline std::string text(const char* s) { return s; }
inline std::string text(const std::string& s) { return s; }
inline std::string text(int x) { return std::to_string(x); }
inline std::string text(long x) { return std::to_string(x); }
inline std::string text(long long x) { return std::to_string(x); }
inline std::string text(double x) { return std::to_string(x); }
inline std::string text(c10::ScalarType t) { return c10::toString(t); }
inline std::string text(const c10::Device& d) { return d.str(); }

template <typename... Parts>
std::string message(const Parts&... parts) {
  std::string out;
  ((out += text(parts)), ...);
  return out;
}

}  // namespace paradec

#define PARADEC_CHECK(cond, ...) TORCH_CHECK(cond, ::paradec::message(__VA_ARGS__))
