// Runtime CPU dispatch for the hot loops: the library is built for baseline x86-64 (portable),
// and each hot entry point is cloned for x86-64-v3 (AVX2+FMA+F16C) and x86-64-v4 (AVX-512),
// picked once at load time by an ifunc resolver.  `flatten` inlines the templated loop bodies
// into every clone so they are vectorised for that target.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define WSSS_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), flatten))
#else
#define WSSS_MULTIVERSION
#endif
