// Placeholder until the vulkan suite lands.
#include <doctest/doctest.h>
