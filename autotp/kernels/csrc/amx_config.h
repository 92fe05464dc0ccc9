// The AMX tile configuration (palette 1) that _tile_loadconfig reads: per tile register, its
// rows and bytes per row. Included inside an AMX target region (isa_amx.cpp,
// isa_amx_attention.cpp), in its anonymous namespace.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};
