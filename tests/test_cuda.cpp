// Placeholder until the cuda suite lands.
#include <doctest/doctest.h>
